"""The /dev/attestation file system, compatible with Gramine's interface, and the FUSE loop that serves it.

``attestation_type`` says what ``quote`` holds ("cove", or "none" when the
platform key is unavailable). A program writes 64 bytes to
``user_report_data``; each open of ``quote`` makes fresh evidence binding the
last data written (zeros before any write), and ``report`` holds the signed
report alone. ``keys/_sgx_mrenclave`` and ``keys/_sgx_mrsigner`` are the
enclave's 16-byte sealing keys. The enclave's identity is fixed when the
file system is made, by the runtime; nothing written here can change it.

The tree is served by :func:`serve`, a single-threaded loop that speaks the
kernel's FUSE protocol on ``/dev/fuse`` itself (``linux/fuse.h``), standard
library only. It handles the dozen requests a fixed tree of small files
needs and answers every other one ENOSYS (or EPERM for what would change the
tree). pyfuse3 and trio cost a per-run server about 110 ms of imports before
its first request, and a quote five round trips through an async loop; this
loop starts with the interpreter and a quote is open, two reads and release
(read-only opens carry FOPEN_NOFLUSH, so no flush is sent for them;
docs/performance.md has the figures).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from cove import util

ROOT = 1  # FUSE_ROOT_ID
REPORT_DATA_SIZE = 64
TIMEOUT = 3600  # the tree never changes: the kernel may keep names and attributes


class FuseError(Exception):
    """Answer the request with this errno."""

    def __init__(self, code: int):
        super().__init__(os.strerror(code))
        self.errno = code


class Attr(NamedTuple):
    inode: int
    mode: int
    uid: int
    gid: int
    size: int
    time_ns: int
    timeout: int = TIMEOUT


class Tree(Protocol):
    """What :func:`serve` asks of a file system; ``pid`` is the calling process as the kernel names it."""

    def lookup(self, parent: int, name: bytes, pid: int) -> Attr: ...
    def getattr(self, inode: int, pid: int) -> Attr: ...
    def setattr(self, inode: int, valid: int, size: int, pid: int) -> Attr: ...
    def open(self, inode: int, flags: int, pid: int) -> int: ...
    def read(self, fh: int, off: int, size: int) -> bytes: ...
    def write(self, fh: int, off: int, data: bytes) -> int: ...
    def flush(self, fh: int) -> None: ...
    def release(self, fh: int) -> None: ...
    def opendir(self, inode: int, pid: int) -> int: ...
    def readdir(self, fh: int, start: int) -> Iterable[tuple[int, Attr, bytes]]: ...


@dataclass
class Node:
    inode: int
    name: bytes
    parent: int
    mode: int
    read: Callable[[], bytes] | None = None  # content made at open
    writable: bool = False


@dataclass
class Handle:
    node: Node
    content: bytes = b""
    written: bytearray | None = None


class AttestationFs:
    """One enclave's tree; ``evidence``/``report`` sign for the current report data."""

    def __init__(
        self,
        attestation_type: str,
        evidence: Callable[[bytes], bytes] | None,
        report: Callable[[bytes], bytes] | None,
        keys: dict[str, Callable[[], bytes]] | None = None,
    ):
        self.report_data = bytes(REPORT_DATA_SIZE)
        self.handles: dict[int, Handle] = {}
        self.next_fh = 1
        self.uid, self.gid = os.getuid(), os.getgid()
        self.started = time.time_ns()
        nodes = [
            Node(ROOT, b"", ROOT, stat.S_IFDIR | 0o555),
            Node(2, b"attestation_type", ROOT, stat.S_IFREG | 0o444, lambda: attestation_type.encode()),
        ]
        if evidence is not None and report is not None:
            nodes += [
                Node(3, b"user_report_data", ROOT, stat.S_IFREG | 0o666, lambda: self.report_data, writable=True),
                Node(4, b"quote", ROOT, stat.S_IFREG | 0o444, lambda: evidence(self.report_data)),
                Node(5, b"report", ROOT, stat.S_IFREG | 0o444, lambda: report(self.report_data)),
            ]
        if keys:
            nodes.append(Node(6, b"keys", ROOT, stat.S_IFDIR | 0o555))
            for i, (name, derive) in enumerate(sorted(keys.items())):
                nodes.append(Node(7 + i, name.encode(), 6, stat.S_IFREG | 0o444, derive))
        self.nodes = {n.inode: n for n in nodes}
        self.names = {(n.parent, n.name): n for n in nodes if n.inode != ROOT}

    def _node(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None:
            raise FuseError(errno.ENOENT)
        return node

    def attr(self, node: Node) -> Attr:
        size = REPORT_DATA_SIZE if node.writable else 0
        return Attr(node.inode, node.mode, self.uid, self.gid, size, self.started)

    def getattr(self, inode: int, pid: int = 0) -> Attr:
        return self.attr(self._node(inode))

    def lookup(self, parent: int, name: bytes, pid: int = 0) -> Attr:
        node = self.names.get((parent, name))
        if node is None:
            raise FuseError(errno.ENOENT)
        return self.attr(node)

    def opendir(self, inode: int, pid: int = 0) -> int:
        if not stat.S_ISDIR(self._node(inode).mode):
            raise FuseError(errno.ENOTDIR)
        return inode

    def readdir(self, fh: int, start: int) -> list[tuple[int, Attr, bytes]]:
        """(cookie, attributes, name) of the entries after ``start``; the cookie is the entry's inode."""
        children = sorted((n for n in self.nodes.values() if n.parent == fh and n.inode != ROOT), key=lambda n: n.inode)
        return [(n.inode, self.attr(n), n.name) for n in children if n.inode > start]

    def open(self, inode: int, flags: int, pid: int = 0) -> int:
        node = self._node(inode)
        if stat.S_ISDIR(node.mode):
            raise FuseError(errno.EISDIR)
        wants_write = flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
        if wants_write and not node.writable:
            raise FuseError(errno.EACCES)
        handle = Handle(node)
        if wants_write:
            handle.written = bytearray()
        if flags & os.O_ACCMODE != os.O_WRONLY:
            try:
                if node.read is None:  # a write-only file: EIO, as before
                    raise LookupError("no content to read")
                handle.content = node.read()
            except Exception:  # a failed signature or key derivation must not kill the file system
                raise FuseError(errno.EIO) from None
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = handle
        return fh

    def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles.get(fh)
        if handle is None:
            raise FuseError(errno.EBADF)
        return handle.content[off : off + size]

    def write(self, fh: int, off: int, data: bytes) -> int:
        handle = self.handles.get(fh)
        if handle is None or handle.written is None:
            raise FuseError(errno.EBADF)
        if off != len(handle.written) or len(handle.written) + len(data) > REPORT_DATA_SIZE:
            raise FuseError(errno.EINVAL)  # report data is exactly 64 bytes, written in order
        handle.written += data
        if len(handle.written) == REPORT_DATA_SIZE:
            self.report_data = bytes(handle.written)
        return len(data)

    def setattr(self, inode: int, valid: int, size: int, pid: int = 0) -> Attr:
        node = self._node(inode)
        if valid & FATTR_SIZE and not (node.writable and size == 0):
            raise FuseError(errno.EACCES)  # only the O_TRUNC of opening user_report_data
        if valid & (FATTR_MODE | FATTR_UID | FATTR_GID):
            raise FuseError(errno.EPERM)
        return self.attr(node)

    def flush(self, fh: int) -> None:
        handle = self.handles.get(fh)
        if handle is not None and handle.written and len(handle.written) != REPORT_DATA_SIZE:
            raise FuseError(errno.EINVAL)  # a short write of report data is an error at close

    def release(self, fh: int) -> None:
        self.handles.pop(fh, None)


# -- the FUSE protocol (linux/fuse.h, protocol 7.x; only what a fixed tree of small files needs)

LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE = 14, 15, 16, 17, 18
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR = 25, 26, 27, 28, 29
INTERRUPT, DESTROY, BATCH_FORGET = 36, 38, 42
# symlink mknod mkdir unlink rmdir rename link create rename2 tmpfile: EPERM, as for any fixed tree
CHANGES_TREE = frozenset({6, 8, 9, 10, 11, 12, 13, 35, 45, 51})
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8
FOPEN_DIRECT_IO, FOPEN_NOFLUSH = 1, 1 << 5
MAX_WRITE = 1 << 16
BUFFER = MAX_WRITE + 4096  # the kernel wants room for a whole write request

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR = "QQQQQQIIIIIIIIII"  # ino size blocks atime mtime ctime (atime mtime ctime)nsec mode nlink uid gid rdev blksize flags
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR)  # nodeid generation entry_valid attr_valid (both)nsec attr
ATTR_OUT = struct.Struct("<QII" + ATTR)  # attr_valid attr_valid_nsec dummy attr
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # ... max_background congestion max_write time_gran max_pages ...
OPEN_IN = struct.Struct("<II")  # flags open_flags
OPEN_OUT = struct.Struct("<QII")  # fh open_flags backing_id
READ_IN = struct.Struct("<QQI")  # fh offset size (then read_flags lock_owner flags)
WRITE_IN = struct.Struct("<QQI4xQII")  # fh offset size write_flags lock_owner flags padding
WRITE_OUT = struct.Struct("<II")
RELEASE_IN = struct.Struct("<Q")  # fh (then flags release_flags lock_owner); FLUSH's starts the same
SETATTR_IN = struct.Struct("<I4xQQ")  # valid padding fh size (then the rest)
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize padding spare
DIRENT = struct.Struct("<QQII")  # ino off namelen type


def _attr_fields(a: Attr) -> tuple[int, ...]:
    seconds, nanos = divmod(a.time_ns, 1_000_000_000)
    nlink = 2 if stat.S_ISDIR(a.mode) else 1
    return (a.inode, a.size, 0, seconds, seconds, seconds, nanos, nanos, nanos, a.mode, nlink, a.uid, a.gid, 0, 4096, 0)


def entry(a: Attr) -> bytes:
    return ENTRY_OUT.pack(a.inode, 0, a.timeout, a.timeout, 0, 0, *_attr_fields(a))


def attributes(a: Attr) -> bytes:
    return ATTR_OUT.pack(a.timeout, 0, 0, *_attr_fields(a))


def dirents(entries: Iterable[tuple[int, Attr, bytes]], size: int) -> bytes:
    out = bytearray()
    for cookie, a, name in entries:
        record = DIRENT.pack(a.inode, cookie, len(name), stat.S_IFMT(a.mode) >> 12) + name
        record += bytes(-len(record) % 8)
        if len(out) + len(record) > size:
            break
        out += record
    return bytes(out)


def _init(body: memoryview) -> bytes:
    major, minor, readahead, _flags = INIT_IN.unpack_from(body)
    if major != 7:
        raise FuseError(errno.EPROTO)
    # no optional feature asked for: plain READDIR, SETATTR for O_TRUNC, no writeback cache
    return INIT_OUT.pack(7, min(minor, 31), readahead, 0, 16, 12, MAX_WRITE, 1, 0, 0, 0, 0)


def _statfs() -> bytes:
    return STATFS_OUT.pack(0, 0, 0, 0, 0, 4096, 255, 4096, 0)


def serve(fd: int, tree: Tree) -> None:
    """Answer the kernel's requests on ``fd`` (an open /dev/fuse) until the file system is unmounted."""
    buffer = bytearray(BUFFER)
    view = memoryview(buffer)
    unpack_header, pack_header = IN_HEADER.unpack_from, OUT_HEADER.pack
    while True:
        try:
            length = os.readv(fd, [buffer])
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                continue  # a request the caller gave up on before it was read
            if exc.errno == errno.ENODEV:
                return  # unmounted
            raise
        _, opcode, unique, inode, _, _, pid, extlen, _ = unpack_header(buffer)
        if opcode in NO_REPLY:
            continue  # nothing is cached per inode, and answers are never delayed: nothing to forget or stop
        body = view[IN_HEADER.size : length - extlen * 8]
        try:
            reply = _answer(tree, opcode, inode, pid, body)
        except FuseError as exc:
            reply, error = b"", -exc.errno
        except Exception as exc:  # a fault in one answer must not take /dev/attestation from every enclave
            print(f"cove: /dev/attestation: request {opcode} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            reply, error = b"", -errno.EIO
        else:
            error = 0
        try:
            os.write(fd, pack_header(OUT_HEADER.size + len(reply), error, unique) + reply)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the caller was interrupted meanwhile
                raise
        if opcode == DESTROY:
            return


def _answer(tree: Tree, opcode: int, inode: int, pid: int, body: memoryview) -> bytes:
    if opcode == OPEN:
        flags = OPEN_IN.unpack_from(body)[0]
        fh = tree.open(inode, flags, pid)
        # a handle nobody wrote to has nothing to report at close: no FLUSH round trip for it
        read_only = flags & os.O_ACCMODE == os.O_RDONLY
        return OPEN_OUT.pack(fh, FOPEN_DIRECT_IO | (FOPEN_NOFLUSH if read_only else 0), 0)
    if opcode == READ:
        fh, offset, size = READ_IN.unpack_from(body)
        return tree.read(fh, offset, size)
    if opcode == RELEASE:
        tree.release(RELEASE_IN.unpack_from(body)[0])
        return b""
    if opcode == LOOKUP:
        return entry(tree.lookup(inode, bytes(body).split(b"\0", 1)[0], pid))
    if opcode == GETATTR:
        return attributes(tree.getattr(inode, pid))
    if opcode == WRITE:
        fh, offset, size, *_ = WRITE_IN.unpack_from(body)
        data = bytes(body[WRITE_IN.size : WRITE_IN.size + size])
        return WRITE_OUT.pack(tree.write(fh, offset, data), 0)
    if opcode == FLUSH:
        tree.flush(RELEASE_IN.unpack_from(body)[0])
        return b""
    if opcode == SETATTR:
        valid, _, size = SETATTR_IN.unpack_from(body)
        return attributes(tree.setattr(inode, valid, size, pid))
    if opcode == OPENDIR:
        return OPEN_OUT.pack(tree.opendir(inode, pid), 0, 0)
    if opcode == READDIR:
        fh, offset, size = READ_IN.unpack_from(body)
        return dirents(tree.readdir(fh, offset), size)
    if opcode == RELEASEDIR or opcode == DESTROY:
        return b""
    if opcode == STATFS:
        return _statfs()
    if opcode == INIT:
        return _init(body)
    raise FuseError(errno.EPERM if opcode in CHANGES_TREE else errno.ENOSYS)


# -- mounting


def mount(mountpoint: str, allow_other: bool) -> int:
    """Mount an empty FUSE file system at ``mountpoint``; the open /dev/fuse to serve it on.

    Root mounts it directly (mount(2)); anyone else through fusermount3, as libfuse does, which hands the
    descriptor back over a socket pair.
    """
    options = "default_permissions" + (",allow_other" if allow_other else "")
    if os.geteuid() == 0:
        import ctypes

        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        data = f"fd={fd},rootmode={stat.S_IFDIR:o},user_id={os.getuid()},group_id={os.getgid()},{options}"
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"cove-attestation", os.fsencode(mountpoint), b"fuse", MS_NOSUID | MS_NODEV, data.encode()):
            code = ctypes.get_errno()
            os.close(fd)
            raise OSError(code, f"mount {mountpoint}: {os.strerror(code)}")
        return fd
    return _fusermount(mountpoint, "fsname=cove-attestation," + options)


MS_NOSUID, MS_NODEV, MNT_DETACH = 2, 4, 2


def _fusermount(mountpoint: str, options: str) -> int:
    import shutil
    import socket
    import subprocess

    tool = shutil.which("fusermount3")
    if tool is None:
        raise OSError(errno.ENOENT, "fusermount3 is not installed (run scripts/setup)")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        done = subprocess.run(
            [tool, "-o", options, "--", mountpoint],
            env=dict(os.environ, _FUSE_COMMFD=str(theirs.fileno())),
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )
        theirs.close()
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            raise OSError(errno.EIO, lines[-1] if lines else f"fusermount3 exited {done.returncode}")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise OSError(errno.EIO, "fusermount3 handed back no descriptor")
    os.set_inheritable(fds[0], False)
    return fds[0]


def mounted(mountpoint: str) -> bool:
    """Whether something is mounted at ``mountpoint`` (a mount whose server died included), without a stat,
    which would wait for a server that has not answered yet."""
    return util.mount_device(mountpoint) is not None


def unmount(mountpoint: str) -> None:
    """Detach the mount (lazily: a process still inside keeps its view until it leaves); quiet if there is none.

    The one helper for every /dev/attestation mount: the per-run server's, the node's, one left by a server that
    died. It never stats the mount, so it does not wait for a server that has not answered yet.
    """
    if not mounted(mountpoint):
        return
    if os.geteuid() == 0:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(mountpoint), MNT_DETACH) == 0 or ctypes.get_errno() in (errno.EINVAL, errno.ENOENT):
            return
    import shutil
    import subprocess

    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is not None:
        subprocess.run([tool, "-u", "-z", mountpoint], capture_output=True, timeout=10)
