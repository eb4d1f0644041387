"""Small helpers shared by every part of Cove."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from pathlib import Path


def die_with_parent(signum: int) -> None:
    """Have the kernel send signum to this process when its parent (thread) ends (PR_SET_PDEATHSIG), for a
    helper that must not outlive what started it; a preexec_fn or a child's first step. Fails loudly."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signum, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
        error = ctypes.get_errno()
        raise OSError(error, f"prctl PR_SET_PDEATHSIG: {os.strerror(error)}")


def write_atomic(path: Path, data: bytes, mode: int = 0o644, sync: bool = True) -> None:
    """Write data to path so readers see the old file or the new one, never a mix.

    ``sync=False`` skips the fsync, for state a crash of the machine makes moot anyway
    (a running process's status): readers still never see a mix.
    """
    import tempfile  # here: tempfile and random are ~3 ms of every importer's start (cove-runtime create)

    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # name the file the user asked for, not the temporary one
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def entry_point_allows(program: str, entry_points: Iterable[str]) -> bool:
    """Whether [process] entry_points admit PROGRAM: a prefix ending in / admits that folder, else one path.

    Only an absolute, normalised path can be admitted: the kernel resolves
    ".." and a prefix match does not ("/opt/app/../../bin/sh" starts with
    "/opt/app/"), so callers normalise first and exec what they checked.
    """
    if not program.startswith("/") or posixpath.normpath(program) != program:
        return False
    return any(program.startswith(p) if p.endswith("/") else program == p for p in entry_points)


def mount_device(mountpoint: str) -> str | None:
    """The ``major:minor`` of what is mounted at ``mountpoint`` (the topmost mount), or None; read from
    /proc/self/mountinfo, because a stat of a FUSE mount waits for its server, which may be this process."""
    with open("/proc/self/mountinfo", "rb") as table:
        return _device_in(table.read(), _mount_path(mountpoint))


def _mount_path(mountpoint: str) -> str:
    parent, name = os.path.split(os.path.abspath(mountpoint))
    return os.path.join(os.path.realpath(parent), name)


def _device_in(table: bytes, target: str) -> str | None:
    found = None
    for line in table.splitlines():
        fields = line.split(b" ", 5)
        if len(fields) > 4 and _unescape_mount_path(fields[4]) == target:
            found = fields[2].decode()
    return found


def _unescape_mount_path(field: bytes) -> str:
    r"""A mountinfo path: space, tab, newline and backslash are written as \ooo octal escapes."""
    if b"\\" not in field:
        return os.fsdecode(field)
    import re

    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field))


class MountIds:
    """The kernel's unique id of the mount at a path (statx STATX_MNT_ID_UNIQUE, Linux 6.8), which is never
    given to another mount until the machine restarts, unlike a mount's device number or its mountinfo id:
    the kernel hands both to the next mount that asks, and a FUSE server mounted again at the same path
    gets the same device number every time. Loaded before a fork (ctypes), so the child only calls."""

    STATX_MNT_ID_UNIQUE = 0x4000
    FLAGS = 0x100 | 0x800 | 0x4000  # AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT | AT_STATX_DONT_SYNC
    MNT_ID_OFFSET = 144  # struct statx: stx_mnt_id

    def __init__(self) -> None:
        import ctypes

        self._buffer = ctypes.create_string_buffer(256)  # struct statx
        self._statx = getattr(ctypes.CDLL(None, use_errno=True), "statx", None)

    def of(self, path: str) -> int | None:
        """The unique id of the mount at ``path``; None when the kernel or libc has none, or the call fails.
        AT_STATX_DONT_SYNC: a FUSE mount answers from what the kernel holds, without asking its server
        (which may be this very process, or dead)."""
        if self._statx is None or self._statx(
            -100, os.fsencode(path), self.FLAGS, self.STATX_MNT_ID_UNIQUE, self._buffer
        ):
            return None
        raw = self._buffer.raw
        if not int.from_bytes(raw[0:4], "little") & self.STATX_MNT_ID_UNIQUE:
            return None
        return int.from_bytes(raw[self.MNT_ID_OFFSET : self.MNT_ID_OFFSET + 8], "little")


class MountWatcher:
    """What :func:`detach_after_exit` leaves: the watcher's pid, and the way to send it off."""

    def __init__(self, pid: int, cancel: int, target: str, device: str, ids: MountIds, unique: int | None):
        self.pid = pid
        self._cancel = cancel
        self._target, self._device = target, device
        self._ids, self._unique = ids, unique

    def release(self) -> None:
        """The mount went the ordinary way (unmounted, then this server's clean end): the watcher leaves now.
        If the mount is in fact still there (an unmount that failed), the watcher stays for it. Idempotent."""
        if self._cancel >= 0 and not _same_mount(self._target, self._device, self._ids, self._unique):
            try:
                os.write(self._cancel, b"x")
            except OSError:
                pass  # the watcher has gone already
            os.close(self._cancel)
            self._cancel = -1


def _same_mount(target: str, device: str, ids: MountIds, unique: int | None) -> bool:
    """Whether the mount at ``target`` is still the one that had ``device`` and ``unique`` (its unique id,
    when the kernel gave one: then it alone decides, and a mount whose id cannot be read is another)."""
    if mount_device(target) != device:
        return False
    return unique is None or ids.of(target) == unique


def detach_after_exit(mountpoint: str) -> MountWatcher:
    """Leave a watcher that lazily detaches this process's FUSE mount at ``mountpoint`` once this process
    has wholly exited, however it ended (kill -9 included), if that mount is still there.

    A dead FUSE server's mount stays (every access fails ENOTCONN) until someone detaches it. fusermount3's
    ``auto_unmount`` is not enough: it wakes when the server's socket to it closes and opens the mount to see
    ENOTCONN, and when that open is sent before the kernel has aborted the connection it fails ECONNABORTED
    instead, so the helper leaves the mount in place (seen under load). The watcher waits on a pidfd, which
    is readable only after every descriptor of this process is released, so the connection has gone; then,
    if the same mount is still at the path, it detaches it. The same mount: the same device number and,
    where the kernel has them (Linux 6.8), the same unique mount id (:class:`MountIds`), so a mount made at
    the path after this one went (a new server's, given the same device number) is never taken for it.
    A server that stops the ordinary way calls :meth:`MountWatcher.release` after its unmount. The watcher has its own session (a
    kill of the server's process group spares it), ignores the usual stop signals, holds nothing but the
    pidfd and its end of a pipe, and costs a fork.
    """
    import re  # noqa: F401 - loaded here, not in the child: an import there could wait on a lock held at the fork
    import select
    import shutil
    import signal

    target = _mount_path(mountpoint)
    device = mount_device(target)
    if device is None:
        raise OSError(f"nothing is mounted at {mountpoint}")
    ids = MountIds()
    unique = ids.of(target)
    pidfd = os.pidfd_open(os.getpid())
    listen, cancel = os.pipe2(os.O_CLOEXEC)
    umount2 = None
    fusermount = None
    if os.geteuid() == 0:
        import ctypes

        umount2 = ctypes.CDLL(None, use_errno=True).umount2  # resolved before the fork: no loader in the child
    else:
        fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    pid = os.fork()
    if pid:
        os.close(pidfd)
        os.close(listen)
        return MountWatcher(pid, cancel, target, device, ids, unique)
    try:  # the child: nothing here may raise out into the parent's code
        os.setsid()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_IGN)
        os.chdir("/")
        low, high = sorted((pidfd, listen))
        os.closerange(0, low)
        os.closerange(low + 1, high)
        os.closerange(high + 1, max(os.sysconf("SC_OPEN_MAX"), high + 1))
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            if fd not in (null, pidfd, listen):
                os.dup2(null, fd)
        watch = select.poll()
        watch.register(pidfd, select.POLLIN)
        watch.register(listen, select.POLLIN)
        while True:
            events = dict(watch.poll())
            if listen in events:
                if os.read(listen, 1):
                    break  # released: the mount went the ordinary way
                watch.unregister(listen)  # its end closed: the server is on its way out; the pidfd says when
            if pidfd in events:  # wholly gone, every descriptor released
                if _same_mount(target, device, ids, unique):
                    if umount2 is not None:
                        umount2(os.fsencode(target), 2 | 8)  # MNT_DETACH | UMOUNT_NOFOLLOW
                    elif fusermount is not None:
                        os.execv(fusermount, [fusermount, "-u", "-z", "-q", "--", target])
                break
    finally:
        os._exit(0)


def watch_mount(mountpoint: str, what: str) -> MountWatcher | None:
    """The mount's watcher (:func:`detach_after_exit`), or None and one line on stderr naming ``what`` when
    there can be none (no fork, no pidfd): a server serves its mount all the same, as before there were
    watchers; a failure here must never end a server whose mount is already in use."""
    import sys

    try:
        return detach_after_exit(mountpoint)
    except OSError as exc:
        print(f"cove: no watcher for {what} at {mountpoint}: {exc}", file=sys.stderr, flush=True)
        return None


class Wakeup:
    """A stop (or reload) flag that a signal handler may set: threading.Event.set takes the event's lock,
    which the interrupted thread may hold (entering or leaving its own wait), and then waits for it forever.
    Here set() is a plain assignment and a byte on a pipe; wait() sleeps in select on that pipe. Any thread
    may set and wait."""

    def __init__(self) -> None:
        self._set = False
        self._read, self._write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def set(self) -> None:
        self._set = True
        try:
            os.write(self._write, b"x")
        except BlockingIOError:
            pass  # the pipe is full of wakeups already

    def is_set(self) -> bool:
        return self._set

    def clear(self) -> None:
        self._set = False
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass

    def wait(self, timeout: float | None = None) -> bool:
        """Whether it is set, after waiting up to ``timeout`` seconds (None: until it is)."""
        import select

        if not self._set:
            select.select([self._read], [], [], timeout)
        return self._set

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)
