"""A measuring prototype of a resident `create` (bench/oci.py --resident-prototype); not a runtime to deploy.

It answers one question before the design in docs/containers.md ("A resident
create") is built: how much of `create` a process that already holds the
verifier and the launcher saves. Two roles in one file:

- `python oci_resident_prototype.py serve SOCKET`: the warm process. It loads
  cove.oci.create, cove.oci.launch and the launcher (launch.warm), then per
  connection forks a worker that takes the client's stdin/stdout/stderr
  (SCM_RIGHTS), runs cove.oci.create.run on the bundle as `create` does
  today (the same verification, refusals, cgroups and start FIFO, so `start`
  is unchanged), answers one JSON line ({"pid", "cpu"} or {"error",
  "code"}), then relays signal numbers to the container's process and
  sends back its exit status.
- The same file with a `#!` line for the venv's Python in front (bench/oci.py
  writes it) is the runtime the engines call: `create` without a console
  socket goes to SOCKET (COVE_PROTO_SOCKET), forks the stub the engine
  waits for (it relays signals and exits with the container's status) and
  records the stub's pid as the container's; every other call is
  cove-runtime's own (cove.oci.cli).

Left out on purpose, because only the design's real version will carry
them: the peer check (the socket is root's, mode 0600), a versioned
endpoint, the console socket, and clean-up when either side is killed.
"""

from __future__ import annotations

import os
import sys

REPLY_LIMIT = 1 << 16


def create_through(argv: list[str]) -> int | None:
    """The client: `[GLOBALS] create --bundle B [--pid-file F] ID` through the warm process; None: not handled."""
    root, index = "/run/cove-runtime", 0
    while index < len(argv) and argv[index].startswith("-"):
        name, eq, value = argv[index].partition("=")
        takes = name in ("--root", "--log", "--log-format", "--node-root") and not eq
        if name == "--root":
            root = value if eq else argv[index + 1]
        index += 2 if takes else 1
    if index >= len(argv) or argv[index] != "create":
        return None
    rest, bundle, pid_file, words, at = argv[index + 1 :], ".", None, [], 0
    while at < len(rest):
        if rest[at] in ("--bundle", "-b", "--pid-file"):
            bundle, pid_file = (rest[at + 1], pid_file) if rest[at] != "--pid-file" else (bundle, rest[at + 1])
            at += 2
        elif rest[at].startswith("--console-socket"):
            return None
        else:
            words.append(rest[at]) if not rest[at].startswith("-") else None
            at += 1
    if len(words) != 1:
        return None
    import array  # only now: every other call is cove-runtime's own and pays for none of these
    import json
    import marshal
    import socket

    ident = words[0]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(os.environ.get("COVE_PROTO_SOCKET", "/run/cove-proto.sock"))
    except OSError:
        return None  # no warm process: today's path
    request = {"root": root, "id": ident, "bundle": os.path.abspath(bundle)}
    conn.sendmsg([json.dumps(request).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
    replies = conn.makefile("rb")
    reply = json.loads(replies.readline(REPLY_LIMIT) or b'{"error": "the warm process ended", "code": 125}')
    if "error" in reply:
        print(f"cove-runtime: error: {reply['error']}", file=sys.stderr)
        return int(reply["code"])
    if os.environ.get("COVE_PROTO_CPU"):  # the worker's CPU up to its answer, for bench/oci.py
        with open(os.environ["COVE_PROTO_CPU"], "a") as log:
            log.write(f"{reply['cpu']:.3f} {reply['pid']}\n")
    ready, readied = os.pipe()
    stub = os.fork()
    if stub == 0:  # the container's process as the engine sees it
        import signal

        os.close(ready)
        os.setsid()

        def relay(number: int, _frame: object) -> None:
            conn.sendall(b"%d\n" % number)

        for number in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
            signal.signal(number, relay)
        os.close(readied)
        line = replies.readline(64).strip()
        code = int(line) if line else 137
        os._exit(128 - code if code < 0 else code)
    os.close(readied)
    os.read(ready, 1)
    conn.close()
    path = os.path.join(root, ident, "state.marshal")
    with open(path, "rb") as handle:
        state = marshal.loads(handle.read())
    with open(f"/proc/{stub}/stat", "rb") as handle:
        stat = handle.read()
    state.update(enclave_pid=state["pid"], pid=stub, pid_start=int(stat[stat.rindex(b")") + 2 :].split()[19]))
    with open(path + ".tmp", "wb") as handle:
        handle.write(marshal.dumps(state))
    os.replace(path + ".tmp", path)
    if pid_file:
        with open(pid_file + ".tmp", "w") as handle:
            handle.write(str(stub))
        os.replace(pid_file + ".tmp", pid_file)
    return 0


def serve(path: str) -> None:
    """The warm process: everything loaded once, a forked worker per `create`."""
    import gc
    import signal
    import socket

    from cove.oci import launch

    launch.warm()
    gc.freeze()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o600)
    server.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel
    while True:
        conn, _ = server.accept()
        if os.fork():
            conn.close()
            continue
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        server.close()
        try:
            _work(conn)
        except BaseException as exc:
            try:
                conn.sendall(b'{"error": "%s", "code": 125}\n' % type(exc).__name__.encode())
            except OSError:
                pass
        os._exit(0)


def _work(conn: object) -> None:
    import array
    import json
    import resource
    import selectors
    import socket

    from cove.errors import CoveError
    from cove.oci import cli, create

    assert isinstance(conn, socket.socket)
    fds = array.array("i")
    message, extra, _, _ = conn.recvmsg(REPLY_LIMIT, socket.CMSG_LEN(3 * fds.itemsize))
    for level, kind, data in extra:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    request = json.loads(message)
    for number, fd in enumerate(fds[:3]):
        os.dup2(fd, number)
        os.close(fd)
    try:
        create.run(request["root"], request["id"], request["bundle"], None, None, 0)
    except CoveError as exc:
        conn.sendall(json.dumps({"error": exc.line(), "code": int(exc.exit_code)}).encode() + b"\n")
        return
    inner = cli.Container(request["root"], request["id"]).load()["pid"]
    used = resource.getrusage(resource.RUSAGE_SELF)
    conn.sendall(json.dumps({"pid": inner, "cpu": (used.ru_utime + used.ru_stime) * 1000}).encode() + b"\n")
    for fd in (0, 1, 2):
        os.close(fd)
    watch = selectors.DefaultSelector()
    watch.register(conn, selectors.EVENT_READ)
    ended = os.pidfd_open(inner)
    watch.register(ended, selectors.EVENT_READ)
    while True:
        for key, _ in watch.select():
            if key.fileobj == ended:
                _, status = os.waitpid(inner, 0)
                conn.sendall(b"%d\n" % os.waitstatus_to_exitcode(status))
                return
            data = conn.recv(64)
            if not data:  # the stub is gone (delete --force): so is the container
                watch.unregister(conn)
            for number in data.split() if data else [b"9"]:
                try:
                    os.kill(inner, int(number))
                except ProcessLookupError:
                    pass


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2])
    code = create_through(sys.argv[1:])
    if code is None:
        from cove.oci.cli import run_main

        run_main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
