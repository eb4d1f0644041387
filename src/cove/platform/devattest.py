"""The /dev/attestation file system (pyfuse3), compatible with Gramine's interface.

``attestation_type`` says what ``quote`` holds ("cove", or "none" when the
platform key is unavailable). A program writes 64 bytes to
``user_report_data``; each open of ``quote`` makes fresh evidence binding the
last data written (zeros before any write), and ``report`` holds the signed
report alone. ``keys/_sgx_mrenclave`` and ``keys/_sgx_mrsigner`` are the
enclave's 16-byte sealing keys. The enclave's identity is fixed when the
file system is made, by the runtime; nothing written here can change it.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3

ROOT = pyfuse3.ROOT_INODE
REPORT_DATA_SIZE = 64


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


class FixedTree(pyfuse3.Operations):
    """A file system whose tree is fixed: nothing can be created, removed or renamed (EPERM)."""

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)


class AttestationFs(FixedTree):
    """The file tree; ``evidence``/``report`` sign for the current report data."""

    def __init__(
        self,
        attestation_type: str,
        evidence: Callable[[bytes], bytes] | None,
        report: Callable[[bytes], bytes] | None,
        keys: dict[str, Callable[[], bytes]] | None = None,
    ):
        super().__init__()
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

    # -- lookups

    def _node(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.st_mode = node.mode
        a.st_nlink = 2 if stat.S_ISDIR(node.mode) else 1
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_size = REPORT_DATA_SIZE if node.writable else 0
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.started
        a.attr_timeout = a.entry_timeout = 3600
        return a

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        for node in self.nodes.values():
            if node.parent == parent_inode and node.name == name and node.inode != ROOT:
                return self._attrs(node)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not stat.S_ISDIR(self._node(inode).mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        children = sorted((n for n in self.nodes.values() if n.parent == fh and n.inode != ROOT), key=lambda n: n.inode)
        for node in children:
            if node.inode <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, node.name, self._attrs(node), node.inode):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    # -- files

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if stat.S_ISDIR(node.mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        wants_write = flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
        if wants_write and not node.writable:
            raise pyfuse3.FUSEError(errno.EACCES)
        handle = Handle(node)
        if wants_write:
            handle.written = bytearray()
        if flags & os.O_ACCMODE != os.O_WRONLY:
            try:
                if node.read is None:  # a write-only file: EIO, as before
                    raise LookupError("no content to read")
                handle.content = node.read()
            except Exception:  # a failed signature or key derivation must not kill the file system
                raise pyfuse3.FUSEError(errno.EIO) from None
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = handle
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles[fh]
        return handle.content[off : off + size]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles[fh]
        if handle.written is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if off != len(handle.written) or len(handle.written) + len(buf) > REPORT_DATA_SIZE:
            raise pyfuse3.FUSEError(errno.EINVAL)  # report data is exactly 64 bytes, written in order
        handle.written += buf
        if len(handle.written) == REPORT_DATA_SIZE:
            self.report_data = bytes(handle.written)
        return len(buf)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if fields.update_size and not (node.writable and attr.st_size == 0):
            raise pyfuse3.FUSEError(errno.EACCES)  # only the O_TRUNC of opening user_report_data
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attrs(node)

    async def flush(self, fh: int) -> None:
        handle = self.handles.get(fh)
        if handle is not None and handle.written and len(handle.written) != REPORT_DATA_SIZE:
            raise pyfuse3.FUSEError(errno.EINVAL)  # a short write of report data is an error at close

    async def release(self, fh: int) -> None:
        self.handles.pop(fh, None)
