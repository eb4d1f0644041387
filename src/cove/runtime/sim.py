"""The `sim` backend: OS-level isolation with bubblewrap, seccomp and a cgroup.

The program runs in fresh user, pid, ipc, uts, cgroup, mount and (unless the
network mode is host) network namespaces, with every capability dropped, no
new privileges, a seccomp deny list, its own session, and limits on memory,
processes and open files. Its root is the verified private copy of the image,
read-only. It protects against other users and processes of the host, not
against the host's root or kernel (docs/threat-model.md).

Started by root, the enclave never runs as host root: bubblewrap is started as
the enclave's ids from a subordinate range (cove.hostids), and the host paths
it binds are opened as root and bound again, in a private mount namespace,
under a neutral folder those ids can reach (as runc passes mount sources by
descriptor). The /proc paths runc masks or makes read-only are masked or
read-only here too. bubblewrap reads its arguments from a descriptor, so
/proc/1/cmdline inside shows no host paths.
"""

from __future__ import annotations

import array  # noqa: F401 - socket.recv_fds imports it: in Prepared's child it must be imported already
import ctypes
import gc
import json
import os
import resource
import signal
import socket
import stat
import subprocess
import threading
from pathlib import Path
from typing import Any

from cove import hostids, trace
from cove.config import ResourcesSection, parse_size
from cove.errors import CoveError, OutOfMemoryError, SandboxError, SetupError
from cove.runtime import seccomp
from cove.runtime.backend import Availability, Backend, LaunchSpec, RunningEnclave, find_tool
from cove.runtime.limits import Limits, detect_mode, memory_text, tmpfs_size
from cove.runtime import terminal
from cove.image.staging import chown_tree

ISOLATION = "namespaces+seccomp"
# runc's default spec: paths of /proc the enclave may read but never write, and paths it never sees
# (a file is covered by /dev/null, a folder by an empty read-only tmpfs). No /sys is mounted at all.
READ_ONLY_PROC = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
MASKED_PROC = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
)
# Where a root-started sandbox finds its bind sources (a private tmpfs over /tmp, see _Sources).
STAGE = "/tmp/.cove"
CLONE_NEWNS, MS_BIND, MS_REC, MS_PRIVATE, MS_NOSUID, MS_NODEV = 0x20000, 0x1000, 0x4000, 0x40000, 0x2, 0x4


def _bwrap() -> str:
    path = find_tool("bwrap")
    if path is None:
        raise SetupError("bubblewrap (bwrap) is not installed", "run scripts/setup")
    return path


def proc_arguments() -> list[str]:
    """bwrap options giving /proc runc's read-only and masked paths (those this kernel has)."""
    args: list[str] = []
    for path in READ_ONLY_PROC:
        if os.path.exists(path):
            args += ["--ro-bind", path, path]
    for path in MASKED_PROC:
        if os.path.isdir(path):
            args += ["--perms", "0555", "--tmpfs", path, "--remount-ro", path]
        elif os.path.exists(path):
            args += ["--ro-bind", "/dev/null", path]
    return args


class _Sources:
    """The host paths a sandbox binds, and what bwrap is told to bind.

    Started by root, bwrap runs as the enclave's subordinate ids, which may
    not be able to reach a source (the private root sits in a folder only root
    enters; a host mount may sit under one). So the child, still root, makes
    a private mount namespace, opens each source, covers /tmp with a fresh
    tmpfs the enclave's ids can traverse and binds each source from its
    descriptor under STAGE there.
    The sandbox then sees the same files, and bwrap's command line names no
    host path. Otherwise (not root) sources are passed through unchanged.
    """

    def __init__(self, ids: hostids.IdRange | None):
        self.ids = ids
        self.uid, self.gid = ids.host(0, 0) if ids else (os.getuid(), os.getgid())
        self.paths: list[tuple[str, bool]] = []

    def __call__(self, path: str) -> str:
        if self.ids is None:
            return path
        try:
            is_dir = stat.S_ISDIR(os.stat(path).st_mode)
        except OSError as exc:
            raise CoveError(f"cannot bind {path} into the sandbox: {exc.strerror}") from None
        self.paths.append((path, is_dir))
        return f"{STAGE}/{len(self.paths) - 1}"

    def writable(self, path: str) -> bool:
        """Whether the enclave's host ids may write into path (its own mode bits, no capabilities)."""
        if self.ids is None:  # the enclave runs as the caller
            return os.access(path, os.W_OK | os.X_OK)
        st = os.stat(path)
        if st.st_uid == self.uid:
            return bool(st.st_mode & 0o200)
        if st.st_gid == self.gid:
            return bool(st.st_mode & 0o020)
        return bool(st.st_mode & 0o002)

    def enter(self, libc) -> None:
        """In the child, before bwrap: bind the sources under STAGE, then become the enclave's ids."""
        if self.ids is None:
            return

        def check(result: int, what: str) -> None:
            if result != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"{what}: {os.strerror(code)}")

        check(libc.unshare(CLONE_NEWNS), "unshare")
        check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "private mounts")
        fds = [os.open(path, os.O_PATH | os.O_CLOEXEC) for path, _ in self.paths]  # before /tmp is covered
        check(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=1777,size=1m"), "tmpfs")
        caller_umask = os.umask(0o022)  # a caller's 027 would shut the enclave's ids out of STAGE
        os.mkdir(STAGE, 0o755)
        for index, (fd, (_, is_dir)) in enumerate(zip(fds, self.paths)):
            target = f"{STAGE}/{index}"
            if is_dir:
                os.mkdir(target, 0o755)
            else:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444))
            check(libc.mount(f"/proc/self/fd/{fd}".encode(), target.encode(), None, MS_BIND | MS_REC, None), "bind")
        os.umask(caller_umask)  # the program's own umask is the caller's
        os.setgroups([])
        os.setresgid(self.gid, self.gid, self.gid)
        os.setresuid(self.uid, self.uid, self.uid)


def bwrap_arguments(spec: LaunchSpec, seccomp_fd: int, status_fd: int, source=lambda path: path) -> list[str]:
    """The bwrap command line for a spec (seccomp and status descriptors already open).

    ``source`` maps a host path to the path bwrap binds it from (see _Sources).
    """
    config = spec.config
    writable = getattr(source, "writable", None)
    args = [
        _bwrap(),
        "--unshare-user",
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-uts",
        "--unshare-cgroup",
        "--uid",
        str(spec.uid),
        "--gid",
        str(spec.gid),
        "--hostname",
        config.enclave.name,
        "--die-with-parent",
        "--cap-drop",
        "ALL",
    ]
    if config.network.mode != "host":
        args.append("--unshare-net")
    # Always a new session: a program left in the caller's session could push keystrokes into the
    # user's shell (TIOCSTI) through /dev/tty, debug run or not. Only the enclave's own pty is bound.
    own_terminal = spec.interactive and terminal.is_own(0)
    args.append("--new-session")
    args += ["--ro-bind", source(str(spec.root)), "/", "--proc", "/proc", "--dev", "/dev", *proc_arguments()]
    # bwrap's /dev is an unsized tmpfs: /dev/shm gets its own tmpfs of at most resources.memory, and
    # /dev itself is made read-only at the end (after every mount point in it exists)
    args += ["--size", str(tmpfs_size(config.resources)), "--perms", "1777", "--tmpfs", "/dev/shm"]
    if own_terminal:  # the enclave's own terminal (cove.runtime.terminal): the program leads the
        # new session and takes /dev/tty as its controlling terminal, for job control
        args += ["--as-pid-1", "--dev-bind", os.ttyname(0), "/dev/tty"]
    for mount in config.mounts:
        if mount.type == "tmpfs":
            options = dict(mount.options)
            requested = parse_size(options["size"]) if "size" in options else None
            args += ["--size", str(tmpfs_size(config.resources, requested))]
            args += ["--perms", options.get("mode", "1777")]
            args += ["--tmpfs", mount.target]
        elif mount.type == "host":
            if mount.source is None or not os.path.exists(mount.source):  # config requires a source
                raise CoveError(
                    f"host mount source {mount.source} does not exist",
                    "create it or remove the mount from cove.toml (and rebuild)",
                )
            if mount.writable and writable is not None and not writable(mount.source):
                raise CoveError(
                    f"host mount source {mount.source} is not writable by the enclave's host "
                    f"user {source.uid}:{source.gid} (enclaves started by root never run as root)",
                    f"chown {source.uid}:{source.gid} {mount.source}, or make the mount read-only",
                )
            args += ["--bind" if mount.writable else "--ro-bind", source(mount.source), mount.target]
    for bind in spec.binds:
        args += ["--bind" if bind.writable else "--ro-bind", source(str(bind.host)), bind.target]
    args += ["--remount-ro", "/dev"]
    args += ["--chdir", config.process.cwd, "--seccomp", str(seccomp_fd), "--json-status-fd", str(status_fd), "--"]
    return args + list(spec.argv)


class SimEnclave(RunningEnclave):
    def __init__(
        self,
        spec: LaunchSpec,
        process: subprocess.Popen,
        status_read: int,
        limits: Limits,
        settings: terminal.Settings | None = None,
    ):
        super().__init__(spec, SimBackend.name, ISOLATION)
        self.process = process
        self.limits = limits
        self.settings = settings  # the user's terminal settings, put back at stop
        self.init_pid: int | None = None
        self.exit_code: int | None = None
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read_status, args=(status_read,), daemon=True)
        self._reader.start()

    def _read_status(self, fd: int) -> None:
        """Follow bwrap's JSON status stream: the sandbox pid, then the exit code."""
        decoder = json.JSONDecoder()
        buffer = ""
        with os.fdopen(fd, "rb") as stream:
            while chunk := stream.read1(4096):
                buffer += chunk.decode("utf-8", "replace")
                while True:
                    buffer = buffer.lstrip()
                    try:
                        item, end = decoder.raw_decode(buffer)
                    except ValueError:
                        break  # an incomplete document: wait for more
                    buffer = buffer[end:]
                    self._status(item)
        self._started.set()

    def _status(self, item: dict) -> None:
        if not isinstance(item, dict):
            return
        if "child-pid" in item:
            self.init_pid = int(item["child-pid"])
            self._started.set()
        if "exit-code" in item:
            self.exit_code = int(item["exit-code"])

    def _program_pid(self) -> int | None:
        """The program's host pid: the child of bwrap's init inside the pid namespace."""
        if self.init_pid is None:
            return None
        try:
            children = Path(f"/proc/{self.init_pid}/task/{self.init_pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def signal(self, signum: int) -> None:
        self._started.wait(timeout=5)
        pid = self._program_pid()
        if pid is None:
            return
        try:
            if self.spec.interactive:
                os.kill(pid, signum)
            else:
                os.killpg(os.getpgid(pid), signum)  # the program's whole process group
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        try:
            code = self.process.wait()
        finally:
            self._reader.join(timeout=2)
        memory = f"resources.memory = {memory_text(self.spec.config.resources.memory)}"
        if self.init_pid is None:
            if self.limits.oom_kills():
                raise OutOfMemoryError(
                    f"killed: out of memory before the program started ({memory})",
                    "raise resources.memory in cove.toml and rebuild",
                )
            raise SandboxError(
                f"the sandbox failed to start (bwrap exited with {code})",
                "see bwrap's message above; `cove info` checks the host",
            )
        if self.exit_code is None:  # no exit code: setting up the enclave failed, or bwrap itself was killed
            if self.limits.oom_kills():  # bwrap may be the one the kernel picks, the program having run and
                # filled memory (its tmpfs files count too): say what is known, not that it never started
                raise OutOfMemoryError(
                    f"killed: out of memory ({memory}): the enclave, tmpfs files included, reached it and the "
                    "sandbox was killed",
                    "raise resources.memory in cove.toml and rebuild",
                )
            raise SandboxError(
                f"the sandbox could not set up the enclave (bwrap exited with {code})",
                "bwrap's message above names what failed",
            )
        code = self.exit_code
        if code == 128 + signal.SIGKILL and self.limits.oom_kills():
            raise OutOfMemoryError(
                f"killed: out of memory ({memory})", "raise resources.memory in cove.toml and rebuild"
            )
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.limits.release()
        if self.settings is not None:
            self.settings.restore()


class SimBackend(Backend):
    name = "sim"
    isolation = ISOLATION
    strength = 10

    @classmethod
    def availability(cls) -> Availability:
        if find_tool("bwrap") is None:
            return Availability(cls.name, cls.isolation, False, "bubblewrap is not installed (scripts/setup)")
        try:
            seccomp.compile_filter("none")
        except SetupError as exc:
            return Availability(cls.name, cls.isolation, False, exc.line())
        return Availability(cls.name, cls.isolation, True, f"resource limits by {detect_mode()}")

    def launch(self, spec: LaunchSpec) -> SimEnclave:
        laps = trace.Laps("sim.")
        prepared = _take_prepared(spec)
        ids = hostids.enclave_range() if os.geteuid() == 0 else None
        sources = prepared.sources if prepared is not None else _Sources(ids)
        if spec.interactive and ids is not None and terminal.is_own(0):
            os.fchown(0, sources.uid, sources.gid)  # the enclave's own terminal, for its host ids
        if ids is not None and not os.path.ismount(spec.root) and os.stat(spec.root).st_uid != sources.uid:
            chown_tree(spec.root, sources.uid, sources.gid)  # a package root root extracted
        laps.lap("ids")
        program = seccomp.enclave_filter(spec.config)
        laps.lap("seccomp")
        if prepared is not None:  # its descriptors and cgroups were made with it, before its fork
            seccomp_fd, status_read, status_write = prepared.seccomp_fd, prepared.status_read, prepared.status_write
            args_fd = prepared.args_fd
            _fill(seccomp_fd, program)
            limits = prepared.limits
        else:
            seccomp_fd = _memfd("cove-seccomp", program)
            status_read, status_write = os.pipe()
            args_fd = -1
            limits = Limits.create(spec.config.resources)
        laps.lap("limits")
        libc = ctypes.CDLL(None, use_errno=True) if ids is not None else None
        error_read, error_write = os.pipe()

        def child() -> None:
            try:
                limits.apply_in_child()
                sources.enter(libc)
            except OSError as exc:  # the parent reports it in one line
                os.write(error_write, (exc.strerror or str(exc)).encode()[:500])
                raise

        settings = terminal.Settings()  # before the program can touch the user's terminal
        try:
            args = bwrap_arguments(spec, seccomp_fd, status_write, sources)
            split = len(args) - len(spec.argv) - 1  # the options go through a descriptor; "--" PROGRAM ARGS stay
            options = b"".join(a.encode() + b"\0" for a in args[1:split])
            process: Any = None
            if prepared is not None:
                _fill(args_fd, options)
                laps.lap("arguments")
                process = prepared.start([args[0], "--args", str(args_fd), *args[split:]], spec.env)
            if process is None:  # not prepared, or its child died before its exec: a fresh one, as ever
                if args_fd < 0:
                    args_fd = _memfd("cove-bwrap-args", options)
                laps.lap("arguments")
                process = subprocess.Popen(
                    [args[0], "--args", str(args_fd), *args[split:]],
                    env=spec.env,
                    pass_fds=(seccomp_fd, status_write, args_fd),
                    close_fds=True,
                    preexec_fn=child,
                    process_group=None if terminal.is_own(0) else 0,  # else the terminal's ^C is relayed
                    restore_signals=True,
                )
        except subprocess.SubprocessError:  # the child could not become the enclave's user
            os.close(error_write)
            error_write = -1
            why = os.read(error_read, 600).decode("utf-8", "replace") or "the child failed"
            os.close(status_read)
            limits.release()
            settings.restore()
            raise CoveError(f"the sandbox could not be prepared: {why}", "`cove info` checks the host") from None
        except BaseException:
            os.close(status_read)
            if prepared is not None:  # its child goes: told nothing, killed, reaped
                for fd in (prepared.go, prepared.error):
                    if fd >= 0:
                        os.close(fd)
                prepared.go = prepared.error = -1
                prepared.kill()
                prepared.wait()
            limits.release()
            settings.restore()
            raise
        finally:
            os.close(seccomp_fd)
            os.close(status_write)
            if args_fd >= 0:
                os.close(args_fd)
            if error_write >= 0:
                os.close(error_write)
            os.close(error_read)
        laps.lap("spawn")
        return SimEnclave(spec, process, status_read, limits, settings)


class Prepared:
    """The next sandbox's first process, forked ahead and already in its enclave's new cgroups.

    Joining a cgroup makes the kernel wait for an RCU grace period (10 to 20 ms on this cgroup v1
    host), and bubblewrap's process paid it between fork and exec, on every start's path. A node
    supervisor (cove.daemon.supervisor) calls :func:`prepare` once it has verified the enclave's
    configuration, so the wait overlaps the rest of its start; :meth:`SimBackend.launch` then hands this
    child what Popen would have been given (the same limits, descriptors, namespaces and ids, checked
    the same way). It does nothing as root but join the cgroups until told; an unused one reads the end
    of its pipe and leaves (also when its parent dies: nothing else holds that pipe's write end).

    The fork can come from a process with other threads (a supervisor's log writer, a launcher's
    services), and the child runs Python until its exec, so it is kept to work that takes no lock
    another thread may have held at the fork (the hazard of Popen's preexec_fn): it imports nothing
    (every module it uses, ``array`` for socket.recv_fds included, is imported before; CPython holds
    and re-creates the import lock across os.fork itself), logs and prints nothing (os.write on its
    error pipe), makes no file object (cgroup.procs by os.open), calls no libc function that
    ctypes did not look up before the fork (a dlsym takes the loader's lock), and runs with the
    collector off (disabled across the fork, never enabled in the child), so no other thread's
    garbage is finalized in it, a file's flush taking that file's lock for one. Allocation is safe:
    glibc resets malloc's locks in a forked child.
    """

    def __init__(self, resources: ResourcesSection, limits: Limits) -> None:
        self.resources, self.limits = resources, limits
        self.sources = _Sources(hostids.enclave_range() if os.geteuid() == 0 else None)
        self.libc = ctypes.CDLL(None, use_errno=True) if self.sources.ids is not None else None
        if self.libc is not None:
            self.libc.unshare, self.libc.mount  # noqa: B018 - looked up (dlsym) here, not in the child
        self.procs = [os.fsencode(group / "cgroup.procs") for group in limits.groups]
        self.seccomp_fd = os.memfd_create("cove-seccomp", 0)
        self.args_fd = os.memfd_create("cove-bwrap-args", 0)
        self.status_read, self.status_write = os.pipe()
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.go = parent_end.detach()
        self.error, error_write = os.pipe()
        collecting = gc.isenabled()
        gc.disable()  # the child's stays off until its exec (see above)
        try:
            pid = os.fork()
            if pid == 0:
                self._child(child_end, error_write)  # never returns
        finally:
            if collecting:
                gc.enable()
        self.pid: int | None = pid
        self.returncode: int | None = None
        child_end.close()
        os.close(error_write)

    def _child(self, go: socket.socket, error_write: int) -> None:
        try:
            os.setpgid(0, 0)
            _close_all_but({0, 1, 2, self.seccomp_fd, self.status_write, self.args_fd, go.fileno(), error_write})
            for procs in self.procs:  # the slow part, done before the start is asked for
                fd = os.open(procs, os.O_WRONLY)
                try:
                    os.write(fd, b"%d" % os.getpid())
                finally:
                    os.close(fd)
            # the order: one byte carrying the parent's stdout and stderr at the start (its log, which it
            # may have set up after this fork), then the JSON until the end of the stream
            first, fds, _, _ = socket.recv_fds(go, 1, 2)
            if not first:
                os._exit(0)  # not used (or the parent died)
            if len(fds) != 2:
                raise OSError("the order came without the output descriptors")
            for target, fd in zip((1, 2), fds):
                os.dup2(fd, target)
                os.close(fd)
            chunks = []
            while chunk := go.recv(1 << 16):
                chunks.append(chunk)
            order = json.loads(b"".join(chunks))
            files = self.resources.max_open_files
            resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
            self.sources.paths = [(str(path), bool(is_dir)) for path, is_dir in order["sources"]]
            self.sources.enter(self.libc)
            for number in (signal.SIGPIPE, signal.SIGXFSZ):  # as Popen's restore_signals
                signal.signal(number, signal.SIG_DFL)
            go.close()
            _close_all_but({0, 1, 2, self.seccomp_fd, self.status_write, self.args_fd, error_write})
            for fd in (self.seccomp_fd, self.status_write, self.args_fd):
                os.set_inheritable(fd, True)
            os.execve(order["argv"][0], order["argv"], order["env"])
        except BaseException as exc:  # noqa: BLE001 - a forked child reports in one line and never returns
            try:
                os.write(error_write, (getattr(exc, "strerror", None) or str(exc) or repr(exc)).encode()[:500])
            finally:
                os._exit(127)

    def start(self, argv: list[str], env: dict[str, str]) -> Prepared | None:
        """Tell the child to become ``argv`` (bubblewrap); raises CoveError with its reason if it cannot,
        None if it died before its exec (killed, out of memory): the caller spawns a fresh one."""
        order = {"argv": argv, "env": env, "sources": self.sources.paths}
        go = socket.socket(fileno=self.go)
        self.go = -1
        try:
            socket.send_fds(go, [b"\0"], [1, 2])
            go.sendall(json.dumps(order).encode())
        except OSError:
            pass  # it is gone: its exit status says so below
        finally:
            go.close()
        why = os.read(self.error, 600).decode("utf-8", "replace")  # empty: the exec closed it
        os.close(self.error)
        self.error = -1
        if why:
            self.wait()
            raise CoveError(f"the sandbox could not be prepared: {why}", "`cove info` checks the host")
        if not self._became(argv[0]):  # the pipe ended with the child, not with an exec
            self.wait()
            return None
        return self

    def _became(self, program: str) -> bool:
        """Whether the child exec'd PROGRAM: an exec sets the task's name (before it closes the error
        pipe), a death keeps the forking process's; a zombie still shows it until reaped here."""
        try:
            with open(f"/proc/{self.pid}/comm", "rb") as handle:
                name = handle.read().rstrip(b"\n")
        except OSError:
            return True  # not ours to tell (no /proc): the enclave's wait reports its end, as after Popen
        return name == os.path.basename(program).encode()[:15]

    # the part of subprocess.Popen the enclave uses
    def poll(self) -> int | None:
        if self.returncode is None and self.pid is not None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        while self.returncode is None and self.pid is not None:
            try:
                _, status = os.waitpid(self.pid, 0)
            except InterruptedError:
                continue
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode if self.returncode is not None else 0

    def kill(self) -> None:
        if self.returncode is None and self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def discard(self) -> None:
        """An unused child: let it go (it reads the end of its pipe), reap it, remove its cgroups."""
        for fd in (self.go, self.error, self.seccomp_fd, self.args_fd, self.status_read, self.status_write):
            if fd >= 0:
                os.close(fd)
        self.go = self.error = -1
        self.wait()
        self.limits.release()


def _close_all_but(keep: set[int]) -> None:
    ordered = sorted(keep)
    for low, high in zip([-1, *ordered], [*ordered, 1 << 20]):
        if high > low + 1:  # closerange(n, n) would close everything from n on
            os.closerange(low + 1, high)


_prepared: list[Prepared] = []


def prepare(resources: ResourcesSection) -> Prepared | None:
    """Fork the next sim sandbox's first process now, in cgroups with these limits (see Prepared), unless
    one for them waits already; None where limits are rlimits. The next launch with the same resources
    uses it; discard_prepared lets go of one that was not used."""
    if _prepared and _prepared[-1].resources == resources and _prepared[-1].poll() is None:
        return _prepared[-1]  # made ahead (cove.daemon.spawner) for these limits, and still waiting
    discard_prepared()
    limits = Limits.create(resources)
    if not limits.groups:
        return None
    try:
        _prepared.append(Prepared(resources, limits))
    except OSError:
        limits.release()
        return None
    return _prepared[-1]


def discard_prepared() -> None:
    while _prepared:
        _prepared.pop().discard()


def _take_prepared(spec: LaunchSpec) -> Prepared | None:
    if _prepared and not spec.interactive and _prepared[-1].resources == spec.config.resources:
        if _prepared[-1].poll() is None:  # a child that died (killed, out of memory) is not taken
            return _prepared.pop()
    discard_prepared()
    return None


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)
    _fill(fd, data)
    return fd


def _fill(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
