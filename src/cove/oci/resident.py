"""A resident `create`: a warm helper that holds the verifier and forks per container; `create` is its client.

Most of `create` used to be a Python start and the verifier's imports
(docs/performance.md, "Engine calls"). The helper (``python -I -m
cove.oci.resident serve SOCKET``) loads them once, with the launcher's
modules, and per request forks a worker that runs cove.oci.create.run as
the in-process path does (same reader, same verification and refusals,
same cgroups, start FIFO and state), with the engine's stdio received over
SCM_RIGHTS. The worker's fork of the container's process waits for `start`
as before, so `start` is unchanged.

The engine needs a container pid that becomes its child (conmon and
containerd's shim are subreapers and reap it). That is the stub: a fork of
the `create` client, left behind as runc leaves its init. It holds the
connection to the worker and nothing of the enclave; it relays the signals
it gets as ``kill N`` lines and ends as the container's process ended (the
same exit code, or the same deadly signal). If the worker goes away without
a status the stub kills the container's process and exits 137; if the stub
goes (``delete --force``), the worker kills the container's process.

Fallback: with no helper answering (none started yet, killed, another
checkout's or format version's, code changed since it started, a non-root
caller), `create` takes the in-process path, unchanged, and starts a helper
for the next one (double-forked, its own session, serialised by a lock). Security: the
socket lives in a root-only folder, mode 0600, and both ends check
SO_PEERCRED uid 0. The wire format is docs/formats/oci-resident.md; the
client side loads only built-in modules and _socket.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable

    from _socket import socket as Socket

DEFAULT_SOCKET = "/run/cove-runtime-resident/sock"  # one helper per machine, for every --root
SETTING = "COVE_RUNTIME_RESIDENT"  # 0 (or off): never; an absolute path: that socket instead of DEFAULT_SOCKET
VERSION = b"COVE-OCI-RESIDENT/2"  # any change of the fields is a new version (/2: UMASK)
FAMILY = b"COVE-OCI-RESIDENT/"  # another version of it is declined (`retry version`), never refused
REQUEST_LIMIT = 1 << 20  # the request's bytes (paths and the environment)
LINE_LIMIT = 4096  # a reply line
SOL_SOCKET, SO_PEERCRED, SCM_RIGHTS = 1, 17, 1  # Linux's
RELAYED = (1, 2, 3, 10, 12, 15)  # SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGTERM: what `cove run` forwards
SELF_KILLED = (1, 2, 9, 10, 12, 13, 14, 15)  # a deadly signal the stub repeats on itself (no core dump)
RESTART = 10  # SIGUSR1: the helper executes itself again (its code changed on disk: it checks that itself)
# COVE_RUNTIME_RESIDENT_IDLE: seconds without a request after which the helper leaves; 0 or unset: never.
# One started on demand by `create` leaves after ON_DEMAND_IDLE unless the variable says otherwise.
IDLE_SETTING, ON_DEMAND_IDLE = "COVE_RUNTIME_RESIDENT_IDLE", "600"


def folder_refusal(folder: str) -> str | None:
    """Why folder may not hold the helper's socket (not root's, reachable or writable by others, a link), or None."""
    try:
        st = os.lstat(folder)
    except OSError as exc:
        return f"{folder}: {exc.strerror}"
    if st.st_mode & 0o170000 != 0o040000:  # S_IFDIR, by lstat: a symbolic link is not one
        return f"{folder} is not a folder (a symbolic link, or another file)"
    if st.st_uid != 0 or st.st_mode & 0o077:
        return f"{folder} must be root's with mode 0700 (it is uid {st.st_uid}, mode {st.st_mode & 0o7777:o})"
    return None


def socket_path() -> str | None:
    """The helper's socket, or None when the resident path is switched off."""
    setting = os.environ.get(SETTING, "")
    if setting in ("0", "off"):
        return None
    return setting if setting.startswith("/") else DEFAULT_SOCKET


def package_dir() -> str:
    """The cove package this code was loaded from: a helper of another checkout is not used."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peer_uid(sock: Socket) -> int:
    """The uid of the process at the other end (struct ucred: pid, uid, gid)."""
    cred = sock.getsockopt(SOL_SOCKET, SO_PEERCRED, 12)
    return int.from_bytes(cred[4:8], sys.byteorder)


def encode_request(fields: list[str], env: list[str]) -> bytes:
    """VERSION, the fields, then the environment: NUL-terminated, behind a 4-byte big-endian length."""
    body = b"".join(os.fsencode(item) + b"\0" for item in [*fields, *env])
    payload = VERSION + b"\0" + body
    return len(payload).to_bytes(4, "big") + payload


# -- the client (inside `cove-runtime create`: built-in modules and _socket only)


def create(
    root: str,
    ident: str,
    bundle: str,
    pid_file: str | None,
    console_socket: str | None,
    node_root: str | None,
    log: tuple[str | None, str],
) -> int | None:
    """`create` through the helper; None: the helper is not there (or declines), take the in-process path."""
    path = socket_path()
    if path is None or os.path.lexists(os.path.join(root, ident)):
        return None  # switched off; or an id in use, which the in-process path refuses in its own words
    import _socket

    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        conn.connect(path)
        if peer_uid(conn) != 0:
            raise OSError("the resident helper is not root's")
    except OSError:
        conn.close()
        start_helper(path)
        return None
    try:
        fields = [
            root if root.startswith("/") else os.path.abspath(root),
            ident,
            os.path.abspath(bundle),
            os.getcwd(),
            console_socket or "",
            node_root or "",
            sys.executable,
            package_dir(),
            "%o" % current_umask(),
        ]
        env = [f"{k}={v}" for k, v in os.environ.items() if "\0" not in k + v]
        conn.sendmsg(
            [encode_request(fields, env)],
            [(SOL_SOCKET, SCM_RIGHTS, b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2)))],
        )
        reply = read_line(conn)
    except OSError:
        reply = b""
    word, _, rest = reply.partition(b" ")
    if word == b"retry":  # another checkout's helper, changed code, or a refusal of this caller
        conn.close()
        return None
    if word == b"error":
        conn.close()
        code, _, line = rest.partition(b" ")
        return _refused(log, line.decode(errors="replace"), int(code) if code.isdigit() else 125)
    if word != b"ok":
        conn.close()
        # no answer: the helper went before it took the connection, or its worker died. What a worker made
        # is removed (the folder did not exist before), and the in-process path makes the container.
        _remove_half_made(root, ident)
        return None
    inner, _, inner_start = rest.partition(b" ")
    return _hand_over(conn, root, ident, int(inner), int(inner_start), pid_file)


def current_umask() -> int:
    """This process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def _refused(log: tuple[str | None, str], line: str, code: int) -> int:
    from cove.oci import cli

    cli.log_error(log[0], log[1], line)
    print(f"cove-runtime: error: {line}", file=sys.stderr)
    return code


def _remove_half_made(root: str, ident: str) -> None:
    """What a worker that died mid-way left: its container's process (if it got that far) and its folder."""
    from cove.oci import cli

    try:
        container = cli.Container(root, ident)
        if not os.path.isdir(container.dir):
            return
        try:
            state = container.load()
        except Exception:  # noqa: BLE001 - no state yet: the container's process ends with the worker's pipe
            state = {}
        if state:
            cli.kill_exact(state["pid"], state.get("pid_start"))
            cli.remove_groups(state.get("container_cgroups", []))
        cli.cleanup(container.dir)
    except Exception:  # noqa: BLE001 - best effort; the refusal is what the engine needs
        pass


def read_line(conn: Socket, limit: int = LINE_LIMIT) -> bytes:
    """One reply line (without its newline); b"" at end of file or if it is longer than limit."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(1)  # byte by byte: nothing after the line may be taken from the stub's reads
        if not chunk or len(data) >= limit:
            return b""
        data += chunk
    return data[:-1]


def _hand_over(conn: Socket, root: str, ident: str, inner: int, inner_start: int, pid_file: str | None) -> int:
    """Fork the stub (the container's pid for the engine), record it in the state, write --pid-file."""
    from cove.oci import cli

    container = cli.Container(root, ident)
    try:
        state = container.load()
    except BaseException:
        conn.close()  # the worker kills the container's process
        _remove_half_made(root, ident)
        raise
    ready, told = os.pipe()
    stub = os.fork()
    if stub == 0:
        _stub(conn, ready, told, inner, inner_start, state.get("engine_cgroups", []))
    os.close(told)
    os.read(ready, 1)  # its signal handlers are set
    os.close(ready)
    conn.close()
    try:
        found = cli.start_time(stub)
        state.update(pid=stub, pid_start=found[0] if found else None, enclave_pid=inner, enclave_start=inner_start)
        container.save(state)
        if pid_file:
            directory, name = os.path.split(pid_file)
            tmp = os.path.join(directory, f".{name}.tmp")
            with open(tmp, "w") as handle:
                handle.write(str(stub))
            os.replace(tmp, pid_file)
    except BaseException:
        os.kill(stub, 9)  # its worker sees the end and kills the container's process
        os.waitpid(stub, 0)
        cli.kill_exact(inner, inner_start)
        try:
            cli.cleanup(container.dir)
        except Exception:  # noqa: BLE001 - something stays mounted: the refusal in hand is the one to give
            pass
        cli.remove_groups(state.get("container_cgroups", []))
        raise
    return 0


def _stub(conn: Socket, ready: int, told: int, inner: int, inner_start: int, groups: list[str]) -> None:
    """The container's process as the engine sees it: relays signals, ends as the container's process did.

    It joins the engine's cgroups (cgroupsPath), as runc's init is in them:
    engines look for the container's pid there. On cgroups v1 a join waits
    out an RCU grace period, so it is done after `create` is told to go on.
    """
    import _signal  # type: ignore[import-not-found]  # signal without enum: built in, no stubs

    code = 125
    try:
        os.close(ready)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # the container's process holds the engine's streams, not this one
            os.dup2(null, fd)
        os.close(null)

        def relay(number: int, _frame: object) -> None:
            try:
                conn.sendall(b"kill %d\n" % number)
            except OSError:
                pass

        for number in RELAYED:
            _signal.signal(number, relay)
        os.write(told, b"1")
        os.close(told)
        for group in groups:
            try:
                fd = os.open(os.path.join(group, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, b"%d" % os.getpid())
                finally:
                    os.close(fd)
            except OSError:
                pass  # a group the engine removed: the container's process joins at `start` and says so
        word, _, status = read_line(conn).partition(b" ")
        if word != b"exit" or not status.lstrip(b"-").isdigit():
            # the worker is gone without a status: nothing may go on without the process the engine watches
            from cove.oci import cli

            cli.kill_exact(inner, inner_start)
            code = 137
        else:
            raw = int(status)
            if os.WIFSIGNALED(raw):
                number = os.WTERMSIG(raw)
                code = 128 + number
                if number in SELF_KILLED:
                    _signal.signal(number, _signal.SIG_DFL)
                    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [number])
                    os.kill(os.getpid(), number)
            else:
                code = os.waitstatus_to_exitcode(raw) & 0xFF
    finally:
        os._exit(code)


def start_helper(path: str, on_demand: bool = True) -> None:
    """Start a helper on path, a grandchild in a session of its own (it takes a lock: a second one leaves).

    Only root starts one, and only in a root-only folder. On demand (from
    `create`) it starts only where init adopts it: under a subreaper (conmon,
    containerd's shim, both of which wait for every descendant before they
    exit) it would keep that engine process alive, so there it leaves at
    once, and the helper comes from `cove-runtime resident` instead.
    """
    if os.geteuid() != 0:
        return
    folder = os.path.dirname(path)
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return
    if folder_refusal(folder):
        return  # a folder others can write or reach: no helper there
    child = os.fork()
    if child == 0:
        try:
            os.setsid()
            middle = os.getpid()
            if os.fork() == 0:
                while os.getppid() == middle:  # until the middle process has gone and someone adopted this one
                    os.sched_yield()
                if on_demand and os.getppid() != 1:
                    os._exit(0)
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.closerange(3, 1 << 16)
                os.chdir("/")
                if on_demand:
                    os.environ.setdefault(IDLE_SETTING, ON_DEMAND_IDLE)
                os.execv(sys.executable, [sys.executable, "-I", "-m", "cove.oci.resident", "serve", path])
        except BaseException:  # noqa: BLE001 - a forked child never returns into create
            pass
        os._exit(0)
    os.waitpid(child, 0)


def run_resident(path: str | None, foreground: bool) -> int:
    """`cove-runtime resident`: start the helper (at boot, or from a unit with --foreground) and wait for it."""
    from cove.errors import CoveError

    path = path or socket_path()
    if path is None:
        raise CoveError(f"{SETTING}=0 switches the resident create off")
    if not path.startswith("/"):
        raise CoveError(f"--socket {path}: an absolute path is needed")
    if os.geteuid() != 0:
        raise CoveError("the resident helper is root's", "run it as root")
    if foreground:
        return serve(path)
    why = folder_refusal(os.path.dirname(path)) if os.path.lexists(os.path.dirname(path)) else None
    if why:  # start_helper would pass it over in silence
        raise CoveError(why, "the resident helper's socket needs a folder only root can reach")
    start_helper(path, on_demand=False)
    import _socket
    import time

    for _ in range(600):
        conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            conn.connect(path)
            if peer_uid(conn) == 0:
                return 0
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.05)
    raise CoveError(f"the resident helper did not answer on {path} within 30 s")


# -- the helper (its own process: everything below loads there)


def serve(path: str) -> int:
    """The helper's loop: take the lock, load everything once, bind, fork a worker per connection.

    It stays single-threaded (checked once loaded: a fork from a process with
    other threads could inherit a lock one of them held, see
    tests/daemon/test_prepared_fork.py) and keeps the garbage collector off
    (what is loaded is frozen; a worker's collections would otherwise touch,
    and so copy, those pages, and a finalizer could take a lock mid-fork).
    It is a subreaper that ignores SIGCHLD: workers and anything orphaned
    below them are reaped by the kernel, never by an engine above it.
    It leaves when its socket is no longer its own, and after
    COVE_RUNTIME_RESIDENT_IDLE seconds without a request when that is set
    (as it is, to ON_DEMAND_IDLE, for one `create` started). Its folder must
    be root-only, as start_helper requires (CoveError otherwise), and the
    lock file is never reached through a symbolic link.
    """
    import ctypes
    import fcntl
    import gc
    import signal
    import socket

    from cove.errors import CoveError

    gc.disable()
    folder = os.path.dirname(path)
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise CoveError(f"{folder}: {exc.strerror}") from None
    why = folder_refusal(folder)
    if why:
        raise CoveError(why, "the resident helper's socket needs a folder only root can reach")
    try:
        lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise CoveError(f"{path}.lock: {exc.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another helper serves
    import importlib

    from cove.oci import create, launch  # noqa: F401 - loaded once, for every worker

    for name in launch.WARM_MODULES:  # the launch's modules; not launch.warm(): its node check is per container
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    snapshot = code_snapshot()
    gc.freeze()
    if len(os.listdir("/proc/self/task")) != 1:
        return 1  # a thread started while loading: forking here would not be safe, so no helper
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)

    def restart(_number: int = RESTART, _frame: object = None) -> None:
        """The same command again, in this process (so outside any engine's tree). The socket and the lock
        are close-on-exec; the new one binds and locks anew. USR1 is ignored across the exec (an ignored
        disposition survives it) until the new image sets this handler: a second one meanwhile is dropped,
        where its default action would end the helper."""
        signal.signal(RESTART, signal.SIG_IGN)
        os.execv(sys.executable, [sys.executable, "-I", "-m", "cove.oci.resident", "serve", path])

    signal.signal(RESTART, restart)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{path}.{os.getpid()}"
    server.bind(tmp)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)  # atomically: a client never finds a socket nobody listens on yet
    server.listen(64)
    own = os.stat(path).st_ino
    server.settimeout(2.0)
    try:
        idle = float(os.environ.get(IDLE_SETTING) or 0) or float("inf")
    except ValueError:
        idle = float("inf")
    last = time_now()
    while True:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            try:
                mine = os.stat(path).st_ino == own
            except OSError:
                mine = False
            if not mine:
                return 0
            if time_now() - last > idle:
                os.unlink(path)
                return 0
            continue
        last = time_now()
        stale = code_snapshot() != snapshot  # the helper's own check: a worker never signals anyone
        try:
            worker = os.fork()
        except OSError:
            conn.close()
            if stale:
                restart()
            continue
        if worker:
            conn.close()
            if stale:  # its worker declines the request; this process starts again with the code as it is now
                restart()
            continue
        code = 0
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(RESTART, signal.SIG_DFL)  # the container's process is forked from here: USR1 is its own
            server.close()
            os.close(lock)
            conn.settimeout(None)
            code = work(conn, stale)
        except BaseException:  # noqa: BLE001 - a worker never returns into the helper's loop
            code = 125
        os._exit(code)


def time_now() -> float:
    import time

    return time.monotonic()


def code_snapshot() -> dict[str, tuple[int, int, int]]:
    """(mtime_ns, size, inode) of every loaded cove module's file: a changed one makes the helper stale."""
    found: dict[str, tuple[int, int, int]] = {}
    package = package_dir() + os.sep
    for key, module in list(sys.modules.items()):
        name = getattr(module, "__file__", None)  # __main__ too: this file, run as `-m cove.oci.resident`
        if isinstance(name, str) and (key.startswith("cove.") or os.path.abspath(name).startswith(package)):
            try:
                st = os.stat(name)
            except OSError:
                continue
            found[name] = (st.st_mtime_ns, st.st_size, st.st_ino)
    return found


class Request:
    """A decoded request (docs/formats/oci-resident.md); ValueError names what is wrong."""

    FIELDS = 9

    def __init__(self, payload: bytes) -> None:
        items = payload.split(b"\0")
        if len(items) < 1 + self.FIELDS + 1 or items[0] != VERSION or items[-1] != b"":
            raise ValueError(f"not a {VERSION.decode().lower()} request")
        fields = [os.fsdecode(item) for item in items[1 : 1 + self.FIELDS]]
        self.root, self.id, self.bundle, self.cwd, console, node_root, self.executable, self.package, mask = fields
        if not 1 <= len(mask) <= 4 or mask.strip("01234567"):
            raise ValueError("the umask is not an octal number")
        self.umask = int(mask, 8)
        self.console_socket = console or None
        self.node_root = node_root or None
        for name, value in (("root", self.root), ("bundle", self.bundle), ("cwd", self.cwd)):
            if not value.startswith("/"):
                raise ValueError(f"{name} is not an absolute path")
        self.env: dict[str, str] = {}
        for item in items[1 + self.FIELDS : -1]:
            key, eq, value = os.fsdecode(item).partition("=")
            if not eq or not key:
                raise ValueError("an environment entry is not NAME=VALUE")
            self.env[key] = value


def receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    """The request's payload and the descriptors sent with it (ValueError: malformed or oversized)."""
    import socket

    fds: list[int] = []
    head = b""
    data = b""
    need: int | None = None
    while need is None or len(data) < need:
        chunk, extra, _, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(16 * 4))
        for level, kind, raw in extra:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(int.from_bytes(raw[i : i + 4], sys.byteorder) for i in range(0, len(raw) - 3, 4))
        if not chunk:
            break
        if need is None:
            head += chunk
            if len(head) < 4:
                continue
            need = int.from_bytes(head[:4], "big")
            if need > REQUEST_LIMIT:
                for fd in fds:
                    os.close(fd)
                raise ValueError(f"the request is over {REQUEST_LIMIT} bytes")
            data = head[4:]
        else:
            data += chunk
    if need is None or len(data) != need:
        for fd in fds:
            os.close(fd)
        raise ValueError("the request ended early" if need is None or len(data) < need else "bytes after the request")
    return data, fds


def work(conn: socket.socket, stale: bool) -> int:
    """One `create`, in a fork of the helper: check the caller, run create.run, then follow the container.

    stale: the helper's code changed on disk (the helper restarts itself);
    the request is read, not decoded (a newer client's may not be this
    code's format), and declined.
    """
    import socket

    def say(line: str) -> None:
        try:
            conn.sendall(" ".join(line.split()).encode(errors="replace") + b"\n")
        except OSError:
            pass

    if conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)[4:8] != bytes(4):
        say("retry not root")  # the socket is root's, mode 0600: only a changed mode lets another uid this far
        return 0
    try:
        payload, fds = receive(conn)
    except (ValueError, OSError) as exc:
        say("retry stale" if stale else f"error 2 resident create: {' '.join(str(exc).split())[:200]}")
        return 0
    if stale:
        for fd in fds:
            os.close(fd)
        say("retry stale")
        return 0
    if payload.startswith(FAMILY) and not payload.startswith(VERSION + b"\0"):
        for fd in fds:  # another version's client (loaded before an upgrade, or another checkout's): in-process
            os.close(fd)
        say("retry version")
        return 0
    try:
        request = Request(payload)
        if len(fds) != 3:
            raise ValueError(f"{len(fds)} descriptors instead of the caller's stdin, stdout and stderr")
    except (ValueError, UnicodeError) as exc:
        for fd in fds:
            os.close(fd)
        say(f"error 2 resident create: {' '.join(str(exc).split())[:200]}")
        return 0
    if (request.executable, request.package) != (sys.executable, package_dir()):
        for fd in fds:
            os.close(fd)
        say("retry other")
        return 0
    for number, fd in enumerate(fds):
        os.dup2(fd, number)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request.env)  # what the container's process would have inherited from `create`
    if request.node_root:
        os.environ["COVE_NODE_ROOT"] = request.node_root
    return _create(conn, request, say)


def _create(conn: socket.socket, request: Request, say: Callable[[str], None]) -> int:
    import selectors

    from cove.errors import CoveError, file_system_error
    from cove.oci import cli, create

    try:
        os.chdir(request.cwd)
        os.umask(request.umask)
        create.run(
            request.root, request.id, request.bundle, None, request.console_socket, 0, close_in_child=(conn.fileno(),)
        )
        state = cli.Container(request.root, request.id).load()
    except CoveError as exc:
        say(f"error {int(exc.exit_code)} {exc.line()}")
        return 0
    except OSError as exc:
        failure = file_system_error(exc)
        say(f"error {int(failure.exit_code)} {failure.line()}")
        return 0
    except Exception as exc:  # noqa: BLE001 - one line for the engine, as cove.oci.cli.unexpected gives
        say(f"error 125 internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
        return 0
    inner = int(state["pid"])
    say(f"ok {inner} {state.get('pid_start') or 0}")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # only the container's process holds the engine's streams now
        os.dup2(null, fd)
    os.close(null)
    ended = os.pidfd_open(inner)
    watch = selectors.DefaultSelector()
    watch.register(conn, selectors.EVENT_READ)
    watch.register(ended, selectors.EVENT_READ)
    pending = b""
    while True:
        for key, _ in watch.select():
            if key.fileobj == ended:
                _, status = os.waitpid(inner, 0)
                say(f"exit {status}")
                return 0
            try:
                data = conn.recv(4096)
            except OSError:
                data = b""
            if not data:  # the stub is gone (delete --force, or killed): so is the container's process
                watch.unregister(conn)
                _kill(inner, 9)
                continue
            pending += data
            *lines, pending = pending.split(b"\n")
            pending = pending[-64:]
            for line in lines:
                word, _, number = line.partition(b" ")
                if word == b"kill" and number.isdigit() and 0 < int(number) < 65:
                    _kill(inner, int(number))


def _kill(pid: int, number: int) -> None:
    try:
        os.kill(pid, number)  # our child, not yet reaped: the pid cannot be another process's
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"] and len(sys.argv) == 3:
        from cove.errors import CoveError

        try:
            sys.exit(serve(sys.argv[2]))
        except CoveError as refusal:
            print(f"cove-runtime resident: error: {refusal.line()}", file=sys.stderr)
            sys.exit(int(refusal.exit_code))
    print("usage: python -m cove.oci.resident serve SOCKET", file=sys.stderr)
    sys.exit(2)
