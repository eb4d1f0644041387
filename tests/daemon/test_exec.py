"""`cove exec` streamed: a terminal of the enclave's (-t), stdin (-i), output as it comes, clients that leave."""

from __future__ import annotations

import fcntl
import os
import pty
import shutil
import select
import signal
import socket
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from tests.conftest import COVE, error_line
from tests.daemon.conftest import GROUP
from tests.e2e.helpers import SHELL_TOOLS, make_instance, set_option

TOOLS = (*SHELL_TOOLS, "/usr/bin/stty", "/usr/bin/tty", "/usr/bin/wc")


@pytest.fixture(scope="module")
def shell_app(node, tmp_path_factory) -> Path:
    parent = tmp_path_factory.mktemp("exec")
    root = make_instance(node.cove, parent, build=False)
    node.cove.ok("add", *TOOLS, cwd=root)
    node.cove.ok("build", cwd=root)
    return root


@pytest.fixture(scope="module")
def running(node, shell_app):
    """A running enclave (a long sleep) to exec into, shared by the module's tests; removed afterwards."""
    ident = node.cove.ok("run", "-d", "/bin/sleep", "600", cwd=shell_app).stdout.strip()
    node.until(ident, "running")
    deadline = time.monotonic() + 20
    while (probe := node.cove("exec", ident, "/bin/echo")).returncode != 0:  # the program itself has started
        assert time.monotonic() < deadline, probe
        time.sleep(0.05)
    yield ident
    node.cove("rm", "-f", ident)


def _read_until(fd: int, marker: bytes, timeout: float = 20) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"never saw {marker!r}; got {seen[-500:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            assert data, f"the terminal closed before {marker!r}; got {seen[-500:]!r}"
            seen += data
    return seen


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_exec_it_gives_a_terminal_of_the_enclave(node, running):
    pid, master = pty.fork()
    if pid == 0:  # the child: `cove exec -it` at a terminal of 33 x 101
        try:
            _set_size(0, 33, 101)
            os.execve(COVE, [COVE, "exec", "-it", running, "/bin/sh"], node.cove.env)
        finally:
            os._exit(120)
    try:
        os.write(master, b"echo mark-$((6 * 7))\n")
        _read_until(master, b"mark-42")
        os.write(master, b"stty size; tty; echo done-$((0 + 1))\n")
        out = _read_until(master, b"done-1\r\n")
        assert b"33 101" in out
        assert b"/dev/pts/" in out  # a terminal of the enclave's own devpts, not the host's
        _set_size(master, 40, 120)  # SIGWINCH to `cove exec`, which sends the new size on
        deadline = time.monotonic() + 20
        while True:
            os.write(master, b"stty size; echo done-$((0 + 2))\n")
            if b"40 120" in _read_until(master, b"done-2\r\n"):
                break
            assert time.monotonic() < deadline, "the new window size never reached the enclave"
            time.sleep(0.1)
        os.write(master, b"exit 3\n")
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(master)


def _host_processes(needle: bytes) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if needle in handle.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_output_streams_and_a_client_that_leaves_leaks_nothing(node, running):
    assert node.process is not None
    before = _fds(node.process.pid)
    client = subprocess.Popen(
        [COVE, "exec", running, "/bin/sh", "-c", "echo first; echo err >&2; sleep 31337; echo never"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=node.cove.env,
    )
    assert client.stdout is not None and client.stderr is not None
    assert client.stdout.readline() == b"first\n"  # the first line, while the program still runs
    assert client.stderr.readline() == b"err\n"
    deadline = time.monotonic() + 20
    while not _host_processes(b"sleep\x0031337"):
        assert time.monotonic() < deadline, "the program never started its sleep"
        time.sleep(0.05)
    assert client.poll() is None
    client.kill()  # the client leaves mid-stream
    client.wait()
    deadline = time.monotonic() + 20
    while _host_processes(b"sleep\x0031337") or _host_processes(b"cove.daemon.execin"):
        assert time.monotonic() < deadline, "the exec'd program or its helper outlived the client"
        time.sleep(0.1)
    while _fds(node.process.pid) > before:
        assert time.monotonic() < deadline, "the daemon kept descriptors of the session"
        time.sleep(0.1)


def _exec_bytes(node, *args: str, data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([COVE, "exec", *args], input=data, capture_output=True, env=node.cove.env, timeout=300)


def test_stdin_huge_and_cut_short(node, running):
    size = 24 << 20
    done = _exec_bytes(node, "-i", running, "/bin/sh", "-c", "cat; echo end >&2", data=b"x" * size)
    assert done.returncode == 0, done.stderr[-500:]
    assert len(done.stdout) == size and done.stdout == b"x" * size and done.stderr == b"end\n"
    # a program that stops reading early: the rest of the input is dropped, the exit code still comes
    early = _exec_bytes(node, "-i", running, "/usr/bin/head", "-c", "5", data=b"y" * size)
    assert (early.returncode, early.stdout) == (0, b"yyyyy")
    # without -i the program's stdin is empty
    assert _exec_bytes(node, running, "/usr/bin/wc", "-c", data=b"ignored").stdout.strip() == b"0"


def test_refusals(node, running, shell_app):
    c = node.cove
    unknown = c("exec", "-it", "no-such-enclave", "/bin/sh")
    assert unknown.returncode == 8 and "no enclave" in error_line(unknown)
    ended = c.ok("run", "-d", "/bin/echo", "hi", cwd=shell_app).stdout.strip()
    node.until(ended, "exited")
    stopped = c("exec", "-i", ended, "/bin/sh")
    assert stopped.returncode == 2 and "not running" in error_line(stopped)
    c.ok("rm", ended)
    # a program outside the entry points, and exit codes of the program itself
    assert c("exec", running, "/bin/sh", "-c", "exit 9").returncode == 9
    assert c("exec", running, "/bin/sh", "-c", "kill -9 $$").returncode == 137
    assert c("exec", running, "/bin/nothing").returncode == 127


def test_a_user_outside_the_group_is_refused(node, running):
    refused = subprocess.run(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", COVE, "exec", "-it", running, "/bin/sh"],
        capture_output=True,
        text=True,
        env=node.cove.env,
        timeout=60,
    )
    assert refused.returncode == 6, refused.stderr
    assert "permission denied" in error_line(refused) or GROUP in error_line(refused)


def test_malformed_frames_end_the_session(node, running):
    """A frame over the limit or of an unknown kind ends the program; the daemon goes on."""
    import json
    import socket

    for bad in (struct.pack(">BxxxI", 0, 1 << 30), struct.pack(">BxxxI", 9, 0), struct.pack(">BxxxI", 4, 3) + b"abc"):
        body = json.dumps({"argv": ["/bin/sleep", "31338"], "stdin": True}).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(node.socket)
            sock.sendall(
                f"POST /v1/enclaves/{running}/exec HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                f"Upgrade: cove-exec/1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(1)
            assert head.startswith(b"HTTP/1.1 101")
            sock.sendall(bad)
            while sock.recv(65536):
                pass  # the daemon closes the session
        deadline = time.monotonic() + 20
        while _host_processes(b"sleep\x0031338"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert node.api("GET", "/v1/version")[0] == 200


@pytest.fixture
def broker(tmp_path):
    from tests.e2e.test_kbs_provisioning import running_broker

    yield from running_broker(tmp_path)


def test_exec_gets_the_provisioned_secrets(node, broker, tmp_path):
    """env: secrets reach an exec'd process as they reached the program, and are written nowhere."""
    from tests.e2e.test_kbs_provisioning import release_to, secrets_config

    c = node.cove
    instance = make_instance(c, tmp_path, extra=secrets_config(broker.url, broker.ca))
    release_to(broker, instance)
    token = "tok-" + os.urandom(12).hex()
    broker.admin.create_secret("app/db/password", "data", "app", value=b"correct horse")
    broker.admin.create_secret("app/api/token", "data", "app", value=token.encode())
    ident = c.ok(
        "run", "-d", "/bin/sh", "-c", '[ -n "$API_TOKEN" ] && echo has-token; sleep 600', cwd=instance
    ).stdout.strip()
    node.until(ident, "running")
    deadline = time.monotonic() + 30
    while "has-token" not in c.ok("logs", ident).stdout:
        assert time.monotonic() < deadline, c.ok("logs", ident).stdout
        time.sleep(0.1)
    try:
        seen = c.ok("exec", ident, "/bin/sh", "-c", 'echo "token=$API_TOKEN"').stdout
        assert seen == f"token={token}\n"
        pid, master = pty.fork()
        if pid == 0:
            try:
                os.execve(COVE, [COVE, "exec", "-it", ident, "/bin/sh", "-c", 'echo "tty-$API_TOKEN"'], node.cove.env)
            finally:
                os._exit(120)
        _read_until(master, f"tty-{token}".encode())
        os.waitpid(pid, 0)
        os.close(master)
        for folder in (node.root, instance):  # never on disk in clear, nor in the daemon's log
            for path in folder.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    assert token.encode() not in path.read_bytes(), path
        assert token not in node.log.read_text()
    finally:
        c("rm", "-f", ident)


def test_kill_9_of_the_daemon_mid_exec_leaves_nothing(node, running):
    client = subprocess.Popen(
        [COVE, "exec", running, "/bin/sh", "-c", "echo up; sleep 31339"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=node.cove.env,
    )
    assert client.stdout is not None and client.stdout.readline() == b"up\n"
    deadline = time.monotonic() + 20
    while not _host_processes(b"sleep\x0031339"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    node.kill9()
    try:
        assert client.wait(timeout=20) == 7  # "the connection to the daemon ended before the program did"
        while _host_processes(b"sleep\x0031339") or _host_processes(b"cove.daemon.execin"):
            assert time.monotonic() < deadline + 10, "the exec'd program outlived the daemon's session"
            time.sleep(0.1)
    finally:
        node.start()
    assert node.state(running)["state"] == "running"  # the enclave itself goes on


@pytest.mark.parametrize(
    "body",
    [
        {"argv": ["/bin/sh"], "tty": "yes"},
        {"argv": ["/bin/sh"], "stdin": 1},
        {"argv": ["/bin/sh"], "tty": True, "rows": -1},
        {"argv": ["/bin/sh"], "tty": True, "cols": 70000},
        {"argv": ["/bin/sh"], "rows": True},
        {"argv": ["/bin/sh", "x" * 70000]},
        {"argv": ["/bin/sh\u0000"]},
        {"argv": "/bin/sh"},
    ],
)
def test_hostile_exec_requests_are_refused_before_the_upgrade(node, running, body):
    import json
    import socket

    data = json.dumps(body).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(node.socket)
        sock.sendall(
            f"POST /v1/enclaves/{running}/exec HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
            f"Upgrade: cove-exec/1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert json.loads(rest)["kind"] == "InvalidRequest"


def test_a_client_that_leaves_takes_the_whole_session(node, running):
    """Jobs an interactive shell put in process groups of their own end with the session too."""
    pid, master = pty.fork()
    if pid == 0:
        try:
            os.execve(COVE, [COVE, "exec", "-it", running, "/bin/sh"], node.cove.env)
        finally:
            os._exit(120)
    try:
        os.write(master, b"/bin/sleep 31343 & /bin/sleep 31344 & echo jobs-$((1 + 1))\n")
        _read_until(master, b"jobs-2")
        deadline = time.monotonic() + 20
        while len(jobs := _host_processes(b"sleep\x0031343") + _host_processes(b"sleep\x0031344")) < 2:
            assert time.monotonic() < deadline, "the jobs never started"
            time.sleep(0.05)
        groups = {os.getpgid(job) for job in jobs}
        assert len(groups) == 2 and os.getsid(jobs[0]) == os.getsid(jobs[1])  # own groups, one session
        os.kill(pid, signal.SIGKILL)  # the client leaves
        os.waitpid(pid, 0)
        while _host_processes(b"sleep\x0031343") or _host_processes(b"sleep\x0031344"):
            assert time.monotonic() < deadline, "a job of the session outlived the client"
            time.sleep(0.1)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(master)


def test_the_exec_program_has_no_capabilities_left(node, shell_app, tmp_path):
    """For an enclave user other than root the bounding set is dropped too (before the change of user,
    after which the drop fails)."""
    copy = tmp_path / "as-user"
    shutil.copytree(shell_app, copy, symlinks=True, ignore=shutil.ignore_patterns("run", "build"))
    set_option(copy / "cove.toml", "process", "user", '"1000:1000"')
    node.cove.ok("build", cwd=copy)
    ident = node.cove.ok("run", "-d", "/bin/sleep", "600", cwd=copy).stdout.strip()
    script = 'while read -r k v; do case $k in Cap*|NoNewPrivs*) echo "$k $v";; esac; done < /proc/self/status; id -u'
    try:
        deadline = time.monotonic() + 20
        while (done := node.cove("exec", ident, "/bin/sh", "-c", script)).returncode != 0:
            assert time.monotonic() < deadline, done.stderr
            time.sleep(0.05)
    finally:
        node.cove("rm", "-f", ident)
    assert done.stdout.splitlines()[-1] == "1000"
    fields = dict(line.split(" ", 1) for line in done.stdout.splitlines()[:-1])
    assert {k: v for k, v in fields.items() if k.startswith("Cap")} == {
        k: "0000000000000000" for k in ("CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:")
    }, done.stdout
    assert fields["NoNewPrivs:"] == "1"


SPEW = "x=0123456789abcdef; x=$x$x$x$x$x$x$x$x; x=$x$x$x$x$x$x$x$x; x=$x$x$x$x$x$x$x$x; while :; do echo $x; done"


def test_exec_without_a_stream_is_bounded_and_has_a_deadline(node, running):
    """Endless output: the daemon keeps the first and last bytes only, and kills the program at the deadline."""
    status, answer = node.api(
        "POST", f"/v1/enclaves/{running}/exec", {"argv": ["/bin/sh", "-c", f"echo first; {SPEW}"], "timeout": 3}
    )
    assert status == 200, answer
    assert answer["timed_out"] is True and answer["exit_code"] == 137
    assert answer["stdout"].startswith("first\n0123") and answer["stdout_dropped"] > 0
    assert len(answer["stdout"]) == 16 << 20 and answer["stderr"] == "" and answer["stderr_dropped"] == 0
    for bad in (0, -1, "soon", True, 1e9):
        assert node.api("POST", f"/v1/enclaves/{running}/exec", {"argv": ["/bin/echo"], "timeout": bad})[0] == 400


def _raw_exec(node, running: str, argv: list[str]) -> socket.socket:
    import json

    body = json.dumps({"argv": argv}).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(node.socket)
    sock.sendall(
        f"POST /v1/enclaves/{running}/exec HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def _gone(needle: bytes, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while _host_processes(needle):
        assert time.monotonic() < deadline, f"{needle!r} outlived its client"
        time.sleep(0.1)


def test_exec_without_a_stream_ends_when_the_client_leaves(node, running):
    sock = _raw_exec(node, running, ["/bin/sleep", "31339"])
    deadline = time.monotonic() + 20
    while not _host_processes(b"sleep\x0031339"):
        assert time.monotonic() < deadline, "the program never started"
        time.sleep(0.05)
    sock.close()  # the client leaves before the answer
    _gone(b"sleep\x0031339")
    _gone(b"cove.daemon.execin")


def test_a_helper_killed_by_a_signal_gives_128_plus_n(node, running):
    """The exit code follows the shell's rule for the helper itself too (not -9, nor 247)."""
    import json

    with _raw_exec(node, running, ["/bin/sleep", "31340"]) as sock:
        deadline = time.monotonic() + 20
        while not (helpers := _host_processes(b"cove.daemon.execin")) or not _host_processes(b"sleep\x0031340"):
            assert time.monotonic() < deadline, "the program never started"
            time.sleep(0.05)
        for helper in helpers:
            os.kill(helper, signal.SIGKILL)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
                break
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["exit_code"] == 137
    _gone(b"sleep\x0031340")


def test_window_changes_while_input_is_stuck_do_not_stop_the_output(node, running):
    """A program that reads no input: stdin backs up to the client, whose SIGWINCH handler must not wait
    for the blocked sender (the output would stop being read)."""
    pid, master = pty.fork()
    if pid == 0:
        try:
            _set_size(0, 24, 80)
            os.execve(
                COVE,
                [
                    COVE,
                    "exec",
                    "-it",
                    running,
                    "/bin/sh",
                    "-c",
                    "stty -echo; echo ready; sleep 3; echo after-$((40 + 2)); sleep 600",
                ],
                node.cove.env,
            )
        finally:
            os._exit(120)
    try:
        _read_until(master, b"ready")
        os.set_blocking(master, False)
        chunk = b"z" * 4096
        stuck = time.monotonic() + 2
        while time.monotonic() < stuck:  # fill every buffer between here and the program's terminal
            try:
                os.write(master, chunk)
            except BlockingIOError:
                time.sleep(0.01)
            os.kill(pid, signal.SIGWINCH)
        for _ in range(20):
            os.kill(pid, signal.SIGWINCH)
            time.sleep(0.02)
        os.set_blocking(master, True)
        _read_until(master, b"after-42")
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(master)


def test_each_exec_is_one_event_with_its_exit_code(node, running):
    """A buffered and a streamed exec each leave one exec event naming the program and its exit code."""
    import json

    status, answer = node.api("POST", f"/v1/enclaves/{running}/exec", {"argv": ["/bin/sh", "-c", "exit 4"]})
    assert status == 200 and answer["exit_code"] == 4, answer
    assert node.cove("exec", running, "/bin/sh", "-c", "exit 5").returncode == 5
    lines = node.api("GET", "/v1/events?follow=0")[1].decode().splitlines()
    events = [e for e in map(json.loads, filter(None, lines)) if e["action"] == "exec" and e["id"] == running]
    # the module's enclave is shared: an earlier test's exec whose client left may end (and be told) late,
    # in between these two; so these are picked by their exit codes, which no other test's exec has
    ours = [(e["program"], e["exit_code"], e["client_left"]) for e in events if e["exit_code"] in (4, 5)]
    assert ours == [("/bin/sh", 4, False), ("/bin/sh", 5, False)], events[-4:]
