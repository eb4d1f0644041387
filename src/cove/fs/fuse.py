"""A volume served as a POSIX file system through FUSE (pyfuse3).

Handlers run one at a time on the trio event loop, so every volume
operation, and every commit, is atomic with respect to the others. A file
that fails a check answers EIO (and the server logs one line naming it);
everything else maps to the errno a local file system would give.

When changes reach the disk as one volume commit: at ``fsync``/``fdatasync``
and ``fsyncdir``, at every rename, unlink and rmdir (the steps programs use
to commit: atomic replace, deleting a journal), when the last writer of a
file closes it, when the server stops, and otherwise at most
``commit_interval`` seconds after a change.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import signal
import stat
import sys
import traceback
from collections.abc import Callable, Sequence

import pyfuse3
import trio

from cove import hostids, util
from cove.errors import CoveError
from cove.fs.errors import FileIntegrityError
from cove.fs.index import Node
from cove.fs.volume import Volume

ATTR_TIMEOUT = 1.0


class VolumeOperations(pyfuse3.Operations):
    """The FUSE request handlers over one open :class:`Volume`."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(
        self, volume: Volume, name: str = "", commit_interval: float = 1.0, log: Callable[[str], None] | None = None
    ):
        super().__init__()
        self.volume = volume
        self.name = name or volume.label
        self.commit_interval = commit_interval
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._fh: dict[int, tuple[Node, bool]] = {}  # fh -> (node, wrote through it)
        self._next_fh = 1
        self._dirs: dict[int, Node] = {}
        self.errors = 0
        self._commit_now = trio.Event()  # set by a last writer's release: the committer commits at once
        self.ids: hostids.IdRange | None = None  # an enclave's mount: ids relative to its host user

    def _owner(self, ctx: pyfuse3.RequestContext) -> tuple[int, int]:
        """The ids stored for a request: the enclave's own ids, not the host's."""
        return self.ids.inside(ctx.uid, ctx.gid) if self.ids else (ctx.uid, ctx.gid)

    # -- plumbing ------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> pyfuse3.FUSEError:
        if isinstance(exc, pyfuse3.FUSEError):
            return exc
        if isinstance(exc, OSError) and exc.errno:
            return pyfuse3.FUSEError(exc.errno)
        self.errors += 1
        if isinstance(exc, FileIntegrityError):
            self.log(f"cove: secure fs {self.name}: {exc.message} (EIO)")
        elif isinstance(exc, CoveError):
            self.log(f"cove: secure fs {self.name}: {exc.line()} (EIO)")
        else:
            self.log(f"cove: secure fs {self.name}: internal error (EIO):\n{traceback.format_exc()}")
        return pyfuse3.FUSEError(errno.EIO)

    def _node(self, ino: int) -> Node:
        return self.volume.inode(ino)

    def attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.ino
        attr.generation = 0
        attr.entry_timeout = ATTR_TIMEOUT
        attr.attr_timeout = ATTR_TIMEOUT
        attr.st_mode = node.mode
        attr.st_nlink = (2 + sum(1 for c in node.entries.values() if c.kind == "d")) if node.kind == "d" else 1
        attr.st_uid, attr.st_gid = self.ids.host(node.uid, node.gid) if self.ids else (node.uid, node.gid)
        attr.st_rdev = 0
        size = self.volume.file_size(node)
        attr.st_size = size
        attr.st_blksize = 4096
        attr.st_blocks = (size + 511) // 512
        attr.st_atime_ns = node.mtime
        attr.st_mtime_ns = node.mtime
        attr.st_ctime_ns = node.ctime
        return attr

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        node.lookups += 1
        return self.attributes(node)

    def commit(self) -> None:
        try:
            self.volume.commit()
        except Exception as exc:
            raise self._fail(exc) from None

    async def committer(self) -> None:
        """Commit at most ``commit_interval`` seconds after a change, at once after a last writer's release."""
        while True:
            with trio.move_on_after(self.commit_interval):
                await self._commit_now.wait()
            self._commit_now = trio.Event()
            if self.volume.dirty or self.volume.has_dirty_handles():
                try:
                    self.volume.commit()
                except Exception as exc:
                    self._fail(exc)

    # -- names -------------------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        try:
            return self._entry(self.volume.lookup(self._node(parent_inode), name))
        except Exception as exc:
            raise self._fail(exc) from None

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            node = self.volume.find_inode(ino)
            if node is not None:
                node.lookups = max(0, node.lookups - count)
                if node.lookups == 0:
                    self.volume.forget(node)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        try:
            return self.attributes(self._node(inode))
        except Exception as exc:
            raise self._fail(exc) from None

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        try:
            node = self._node(inode)
            uid, gid = self.ids.inside(attr.st_uid, attr.st_gid) if self.ids else (attr.st_uid, attr.st_gid)
            self.volume.setattr(
                node,
                mode=attr.st_mode if fields.update_mode else None,
                uid=uid if fields.update_uid else None,
                gid=gid if fields.update_gid else None,
                size=attr.st_size if fields.update_size else None,
                mtime=attr.st_mtime_ns if fields.update_mtime else None,
            )
            return self.attributes(node)
        except Exception as exc:
            raise self._fail(exc) from None

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if node.kind != "l" or node.target is None:  # a symlink always has its target
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            node = self.volume.mkdir(self._node(parent_inode), name, mode & ~ctx.umask, *self._owner(ctx))
            return self._entry(node)
        except Exception as exc:
            raise self._fail(exc) from None

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            return self._entry(self.volume.symlink(self._node(parent_inode), name, target, *self._owner(ctx)))
        except Exception as exc:
            raise self._fail(exc) from None

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if not stat.S_ISREG(mode):
            raise pyfuse3.FUSEError(errno.EPERM)  # no devices, fifos or sockets in a volume
        try:
            node = self.volume.create_file(self._node(parent_inode), name, mode & ~ctx.umask, *self._owner(ctx))
            return self._entry(node)
        except Exception as exc:
            raise self._fail(exc) from None

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)  # no hard links

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        try:
            self.volume.unlink(self._node(parent_inode), name)
            self.volume.commit()  # durable at once: the unit apps commit with
        except Exception as exc:
            raise self._fail(exc) from None

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        try:
            self.volume.rmdir(self._node(parent_inode), name)
            self.volume.commit()  # durable at once: the unit apps commit with
        except Exception as exc:
            raise self._fail(exc) from None

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        try:
            self.volume.rename(self._node(parent_inode_old), name_old, self._node(parent_inode_new), name_new, flags)
            self.volume.commit()
        except Exception as exc:
            raise self._fail(exc) from None

    # -- files -------------------------------------------------------------------------

    def _open_fh(self, node: Node) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._fh[fh] = (node, False)
        return fh

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        try:
            node = self._node(inode)
            if flags & (os.O_WRONLY | os.O_RDWR) and not self.volume.writable:
                raise OSError(errno.EROFS, "read-only")
            self.volume.acquire(node)
            fh = self._open_fh(node)
            if flags & os.O_TRUNC:
                self.volume.truncate(node, 0)
                self._fh[fh] = (node, True)
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        except Exception as exc:
            raise self._fail(exc) from None

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        try:
            node = self.volume.create_file(self._node(parent_inode), name, mode & ~ctx.umask, *self._owner(ctx))
            node.opens += 1
            fh = self._open_fh(node)
            self._fh[fh] = (node, True)
            return pyfuse3.FileInfo(fh=fh), self._entry(node)
        except Exception as exc:
            raise self._fail(exc) from None

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            return self.volume.read(self._fh[fh][0], off, size)
        except Exception as exc:
            raise self._fail(exc) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            node, _ = self._fh[fh]
            written = self.volume.write(node, off, buf)
            self._fh[fh] = (node, True)
            return written
        except Exception as exc:
            raise self._fail(exc) from None

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        node, wrote = self._fh.pop(fh)
        try:
            self.volume.release(node)
        except Exception as exc:
            raise self._fail(exc) from None
        if wrote and node.linked and node.opens == 0:
            # The last writer closed the file: commit, but after this reply. The kernel sends RELEASE
            # without waiting for it, and an enclave that exits is unmounted right away; a commit before
            # the reply made libfuse print "fuse_release(): fuse_reply_* failed" once the unmount had
            # dropped the request. The commit is not lost either way: the server commits before it exits.
            self._commit_now.set()

    async def fsync(self, fh: int, datasync: bool) -> None:
        self.commit()

    # -- folders -----------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if node.kind != "d":
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        node = self._node(fh)
        entries = [(b".", node), (b"..", node.parent or node)] + sorted(node.entries.items())
        for index in range(start_id, len(entries)):
            name, child = entries[index]
            if not pyfuse3.readdir_reply(token, name, self.attributes(child), index + 1):
                break
            if index >= 2:  # the kernel counts no lookup for . and ..
                child.lookups += 1

    async def releasedir(self, fh: int) -> None:
        pass

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.commit()

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        host = os.statvfs(self.volume.path)
        data = pyfuse3.StatvfsData()
        data.f_bsize = 4096
        data.f_frsize = 4096
        data.f_blocks = host.f_blocks * host.f_frsize // 4096
        data.f_bfree = host.f_bfree * host.f_frsize // 4096
        data.f_bavail = host.f_bavail * host.f_frsize // 4096
        data.f_files = self.volume.inode_count + host.f_ffree
        data.f_ffree = host.f_ffree
        data.f_favail = host.f_favail
        data.f_namemax = 255
        return data


class ImageOperations(VolumeOperations):
    """A read-only view of an encrypted image that checks each file against the signed digest.

    A file is hashed in full on its first open; if it differs from the
    measured digest, it answers EIO from then on.
    """

    def __init__(self, volume: Volume, digests: dict[str, bytes], name: str = "", commit_interval: float = 1.0) -> None:
        super().__init__(volume, name, commit_interval)
        self.digests = digests
        self.verified: set[int] = set()
        self.failed: set[int] = set()

    def _verify(self, node: Node) -> None:
        if node.ino in self.verified:
            return
        if node.id is None:  # a mount point for a file bind: a bind covers it
            raise OSError(errno.EACCES, "a mount point")
        path = node.path().lstrip("/")
        if node.ino not in self.failed:
            digest = hashlib.sha256()
            handle = self.volume.acquire(node)
            try:
                size, offset = handle.size(), 0
                while offset < size:
                    chunk = self.volume.read(node, offset, 1 << 20)
                    digest.update(chunk)
                    offset += len(chunk)
            finally:
                self.volume.release(node)
            if hmac.compare_digest(digest.digest(), self.digests.get(path, b"")):
                self.verified.add(node.ino)
                return
            self.failed.add(node.ino)
        raise FileIntegrityError(f"/{path}: its content differs from the signed image listing")

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        try:
            node = self._node(inode)
            if flags & (os.O_WRONLY | os.O_RDWR):
                raise OSError(errno.EROFS, "read-only")
            self._verify(node)
        except Exception as exc:
            raise self._fail(exc) from None
        return await super().open(inode, flags, ctx)


def serve(
    volume: Volume,
    mountpoint: str,
    *,
    name: str = "",
    commit_interval: float = 1.0,
    on_ready: Callable[[], None] | None = None,
    read_only: bool = False,
    digests: dict[str, bytes] | None = None,
    for_enclave: bool = False,
) -> None:
    """Mount ``volume`` at ``mountpoint`` and serve it until unmounted (or SIGTERM/SIGINT).

    With ``digests`` (path -> SHA-256) it is an image view: see ImageOperations.
    ``for_enclave``: an enclave's mount; it shows the volume's ids relative to
    the enclave's host user (cove.hostids). Started by root, the enclave runs
    as subordinate host ids, so the mount lets them in (``allow_other``, in a
    folder only root and they can reach); otherwise only the mounting user
    gets in.
    """
    if digests is not None:
        ops: VolumeOperations = ImageOperations(volume, digests, name=name, commit_interval=commit_interval)
    else:
        ops = VolumeOperations(volume, name, commit_interval)
    options = set(pyfuse3.default_options)
    # auto_unmount: fusermount3 stays beside the server and detaches the mount when the server's
    # end of /dev/fuse closes, so a server killed with its launcher (kill -9 of both, an OOM kill)
    # never leaves a dead mount (ENOTCONN to every reader) in the runtime folder
    options |= {"fsname=cove", "subtype=cove", "default_permissions", "auto_unmount"}
    if for_enclave:
        ops.ids = hostids.enclave_range()
        if os.geteuid() == 0:
            options.add("allow_other")
    if read_only or not volume.writable:
        options.add("ro")
    pyfuse3.init(ops, mountpoint, options)
    # and a watcher of our own for the case auto_unmount misses (cove.util.detach_after_exit); without one
    # (no fork, no pidfd) the volume is still served, with auto_unmount alone
    watcher = util.watch_mount(mountpoint, "the volume")
    terminated = False

    async def watch_signals() -> None:
        nonlocal terminated
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for _ in signals:
                terminated = True
                pyfuse3.terminate()
                return

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals)
            if volume.writable:
                nursery.start_soon(ops.committer)
            if on_ready is not None:
                on_ready()
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    clean = False
    try:
        trio.run(main)
        clean = True
    finally:
        pyfuse3.close(unmount=terminated or not clean)
        if watcher is not None:
            watcher.release()  # the mount went the ordinary way (if it is still there, the watcher stays)
