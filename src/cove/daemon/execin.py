"""`cove exec`: a new process in a running enclave (``python -m cove.daemon.execin PID CONTROL_FD``).

The daemon runs this helper as root for one request and sends the request's
spec as JSON over the control socket CONTROL_FD (never on the command line,
which every host user can read: the environment may hold provisioned
secrets). It takes the enclave's program (host pid PID, with the start
time the daemon read, so a reused pid is refused) as the reference, through
one /proc/PID directory descriptor: it reads the values of the ``env:`` secrets from that program's initial
environment (so they are never written anywhere), joins its cgroups, opens
its namespaces and root, enters them (user first, then the others it owns,
the mount namespace and root last; for an enclave user other than root, the
owner of the program's nested user namespace first and that one after the
mount namespace, see entry_order), and forks so the new process is in the
enclave's pid namespace. It ends with the daemon's thread that started
it (PR_SET_PDEATHSIG), so a daemon killed mid-session leaves nothing. With a terminal, the pseudo-terminal is opened
there, in the devpts the enclave sees, and its master end goes back to the
daemon over the control socket (SCM_RIGHTS). The child leads a session of
its own (the terminal's, with one), drops the bounding set (while still
root there: after the change of user the drop would fail), takes the
enclave's user, drops every other capability (ambient, permitted,
effective, inheritable; every prctl checked), dies with
this helper, sets no_new_privs and the same seccomp filter the sandbox has,
the same open-files limit, the enclave's environment and working folder, and
execs the program. The helper relays its exit code (128 + N for a signal);
SIGTERM to the helper kills every process of the child's session, found in
the host's /proc (a job in a process group of its own included). Everything it needs
is imported before it enters the enclave's mount namespace, where no host
file is visible.
"""

from __future__ import annotations

import ctypes
import errno

import fcntl
import json
import os
import resource
import signal
import socket
import struct
import sys
import termios
from typing import Any

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID = 0x20000, 0x10000000, 0x20000000
NAMESPACES = (
    ("user", CLONE_NEWUSER),
    ("ipc", 0x08000000),
    ("uts", 0x04000000),
    ("net", 0x40000000),
    ("cgroup", 0x02000000),
    ("pid", CLONE_NEWPID),
    ("mnt", CLONE_NEWNS),
)
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 1, 38, 24, 47, 4
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
CAP_LAST = 63
NS_GET_USERNS = 0xB701  # _IO(0xb7, 0x1): the user namespace that owns a namespace
OWNER_ROOT = -1  # a step of entry_order: setresuid(0) in the owner namespace just entered

MAX_SPEC = 1 << 22


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def open_process(pid: int, start: int) -> int:
    """A /proc/PID directory descriptor of the very process the daemon chose (pid and start time).

    Everything else is read relative to it: a pid reused after this open leaves the descriptor on the
    old, ended process (reads fail), and one reused before it has another start time (refused here).
    """
    proc = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if start_time(proc) != start:
        os.close(proc)
        raise ProcessLookupError(errno.ESRCH, f"process {pid} is no longer the enclave's program")
    return proc


def start_time(proc: int) -> int:
    """Field 22 of the stat file in a /proc/PID directory descriptor: the start time in clock ticks."""
    data = _read_at(proc, "stat")
    return int(data[data.rindex(b")") + 2 :].split()[19])


def _read_at(proc: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def join_cgroups(proc: int) -> None:
    """Put this process in the cgroups of the process whose /proc directory proc is (v1 controllers or v2)."""
    lines = _read_at(proc, "cgroup").decode().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        names = [c.replace("name=", "") for c in controllers.split(",") if c] or [""]
        for name in names:
            procs = os.path.join("/sys/fs/cgroup", name, path.lstrip("/"), "cgroup.procs")
            try:
                with open(procs, "w") as handle:
                    handle.write(str(os.getpid()))
            except OSError:
                continue  # a controller Cove does not limit (e.g. a read-only one)


def initial_environment(proc: int, names: list[str]) -> dict[str, str]:
    """The values of ``names`` in the environment the process was started with (environ under proc)."""
    wanted = set(names)
    if not wanted:
        return {}
    data = _read_at(proc, "environ")
    found: dict[str, str] = {}
    for item in data.split(b"\0"):
        name, sep, value = item.partition(b"=")
        key = name.decode("utf-8", "replace")
        if sep and key in wanted:
            found[key] = value.decode("utf-8", "surrogateescape")
    return found


def read_spec(control: socket.socket) -> dict[str, Any]:
    data = b""
    while chunk := control.recv(65536):
        data += chunk
        if len(data) > MAX_SPEC:
            raise ValueError("the spec is too large")
    spec: dict[str, Any] = json.loads(data)
    return spec


def _prctl(libc: ctypes.CDLL, name: str, option: int, arg: int = 0) -> None:
    """prctl(2), checked: a step of the drop of privileges that fails stops the exec."""
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl {name}")


def drop_bounding_set(libc: ctypes.CDLL) -> None:
    """Drop every capability from the bounding set, up to the kernel's last one (EINVAL past it)."""
    for cap in range(CAP_LAST + 1):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            error = ctypes.get_errno()
            if error == errno.EINVAL and cap > 0:
                return  # beyond the kernel's last capability
            raise OSError(error, f"prctl PR_CAPBSET_DROP {cap}")


def kill_session(proc_root: int, sid: int) -> None:
    """SIGKILL every process of session sid, in passes until none is left.

    ``proc_root`` is the host's /proc (opened before entering the enclave), so sid and the pids are
    host pids. A process group is not enough: an interactive shell puts each job in a group of its own.
    """
    for _ in range(100):
        found = False
        for name in os.listdir(proc_root):
            if not name.isdigit():
                continue
            try:
                data = _read_at(proc_root, f"{name}/stat")
                fields = data[data.rindex(b")") + 2 :].split()
                if fields[0] != b"Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
                    os.kill(int(name), signal.SIGKILL)
                    found = True
            except (OSError, ValueError, IndexError):
                continue
        if not found:
            return


def entry_order(fds: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The order to enter the program's namespaces (``fds``, user first and mount last, as opened).

    An enclave whose user is not root runs in a user namespace nested in the one that owns its other
    namespaces (bubblewrap makes a second one to change to that user). Entering the inner one first
    would leave no right to enter the others: enter the owner (NS_GET_USERNS of the mount namespace)
    first, become its root (the inner namespace's owner), and enter the inner one after the mount one.
    """
    user = fds[0][0]
    owner = fcntl.ioctl(fds[-1][0], NS_GET_USERNS)
    same = (os.fstat(owner).st_dev, os.fstat(owner).st_ino) == (os.fstat(user).st_dev, os.fstat(user).st_ino)
    if same:
        os.close(owner)
        return fds
    os.set_inheritable(owner, False)
    return [(owner, CLONE_NEWUSER), (-1, OWNER_ROOT), *fds[1:], fds[0]]


def _child(spec: dict[str, Any], libc: ctypes.CDLL, program: bytes, slave: int | None) -> None:
    """In the enclave's pid namespace: become the enclave's unprivileged process and exec (never returns)."""
    try:
        if slave is not None:
            os.login_tty(slave)  # a new session whose controlling terminal is the enclave's pty
        else:
            os.setsid()  # never the daemon's terminal, if it has one
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        drop_bounding_set(libc)  # while still root here: dropping needs CAP_SETPCAP, which setresuid takes
        os.setresgid(spec["gid"], spec["gid"], spec["gid"])
        os.setresuid(spec["uid"], spec["uid"], spec["uid"])
        # after the change of user, which clears it: die with the helper (a client that left, a kill -9)
        _prctl(libc, "PR_SET_PDEATHSIG", PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != 0:  # the helper is outside this pid namespace; a parent here means it is gone
            os._exit(137)
        _prctl(libc, "PR_CAP_AMBIENT", PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        data = (_CapData * 2)()
        if libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), data) != 0:
            raise OSError(ctypes.get_errno(), "capset")
        files = spec["max_open_files"]
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "no_new_privs")
        buffer = ctypes.create_string_buffer(program, len(program))
        fprog = _Fprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
        if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "seccomp")
        os.chdir(spec["cwd"])
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except OSError as exc:
        code = 127 if exc.errno == 2 else 126
        os.write(2, f"cove: error: {spec['argv'][0]}: {exc.strerror or exc}\n".encode())
        os._exit(code)
    except BaseException:  # noqa: BLE001 - a forked child must never return
        os._exit(125)


def main(argv: list[str]) -> int:
    child = 0
    host_proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the host's, for kill_session

    def end(_signum: int, _frame: object) -> None:
        """The client left: the program's whole session goes (its pid is its session's id)."""
        if child:
            kill_session(host_proc, child)
        else:
            os._exit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, end)
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getppid()  # (a parent gone even before this has closed the control socket: no spec comes)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:  # the daemon's session thread ends: so does this
        print(f"cove: error: cannot enter the enclave: prctl: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 125
    pid = int(argv[0])
    control = socket.socket(fileno=int(argv[1]))
    try:
        spec = read_spec(control)
    except (OSError, ValueError):
        print("cove: error: cannot enter the enclave: no request came from the daemon", file=sys.stderr)
        return 125
    program = bytes.fromhex(spec["seccomp"])
    try:
        proc = open_process(pid, int(spec["start"]))
        env = {**spec["env"], **initial_environment(proc, spec.get("secret_env", []))}
        join_cgroups(proc)
        fds = [(os.open(f"ns/{name}", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc), flag) for name, flag in NAMESPACES]
        root = os.open("root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=proc)
        if start_time(proc) != int(spec["start"]):  # still the same process after every open
            raise ProcessLookupError(errno.ESRCH, f"process {pid} is no longer the enclave's program")
    except OSError as exc:
        print(f"cove: error: cannot enter the enclave: its program is gone ({exc.strerror or exc})", file=sys.stderr)
        return 125
    os.close(proc)
    os.setgroups([])  # here, in the host's user namespace: the enclave's one denies setgroups
    try:
        steps = entry_order(fds)
    except OSError as exc:
        print(f"cove: error: cannot enter the enclave: {exc.strerror or exc}", file=sys.stderr)
        return 125
    for fd, flag in steps:
        if flag == OWNER_ROOT:
            os.setresuid(0, 0, 0)  # the outer namespace's root: the owner of the program's own (inner) one
            continue
        if libc.setns(fd, flag) != 0:
            error = ctypes.get_errno()
            print(f"cove: error: cannot enter the enclave: setns: {os.strerror(error)}", file=sys.stderr)
            return 125
        os.close(fd)
    os.fchdir(root)
    os.chroot(".")
    os.close(root)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:  # again: entering the user namespace cleared it
        print(f"cove: error: cannot enter the enclave: prctl: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 125

    if os.getppid() != parent:
        return 128 + signal.SIGTERM  # it ended in between (the daemon may be pid 1 in a container: compare)
    slave = None
    if spec.get("tty"):
        try:
            master, slave = os.openpty()  # /dev/ptmx of the enclave's own devpts
        except OSError as exc:
            print(f"cove: error: cannot open a terminal in the enclave: {exc.strerror}", file=sys.stderr)
            return 125
        rows, cols = int(spec.get("rows") or 24), int(spec.get("cols") or 80)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        socket.send_fds(control, [b"m"], [master])
        os.close(master)
    control.close()
    child = os.fork()  # only a child is in the enclave's pid namespace
    if child == 0:
        _child(dict(spec, env=env), libc, program, slave)
    env.clear()
    if slave is not None:
        os.close(slave)
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
