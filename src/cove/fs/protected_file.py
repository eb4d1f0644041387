"""A protected file: random-access encrypted, authenticated, path-bound content.

The public face of the format. It owns the metadata node (path, size, root
key and MAC, first 3072 content bytes) and the commit protocol; the tree of
data and MHT nodes is :mod:`cove.fs.merkle_tree`, the undo log :mod:`cove.fs.journal`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from cove.fs import crypto, journal
from cove.fs.errors import FileIntegrityError, ProtectedFileError
from cove.fs.layout import (
    ENC_OFFSET,
    ENC_SIZE,
    HAS_PENDING_WRITE,
    HEADER,
    KEY_SIZE,
    KNOWN_FLAGS,
    MAC_SIZE,
    MAGIC,
    MAJOR_VERSION,
    MD_USER_DATA_SIZE,
    MINOR_VERSION,
    NODE_SIZE,
    NONCE_SIZE,
    PAD_OFFSET,
    PATH_MAX_SIZE,
    Header,
    MetaPlain,
    node_count,
    unpack_meta_plain,
)
from cove.fs.merkle_tree import Run, Tree
from cove.fs.writer import AsyncWriter

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_CACHE_BYTES = 4 << 20
ASYNC_WRITE_BYTES = 256 << 10  # runs this large are written by a second thread
MODES = ("r", "r+", "w", "x")


def _encode_path(logical_path: str) -> bytes:
    raw = logical_path.encode("utf-8")
    if b"\0" in raw:
        raise ProtectedFileError(f"logical path {logical_path!r} contains a NUL byte")
    if len(raw) > PATH_MAX_SIZE - 1:
        raise ProtectedFileError(f"logical path is {len(raw)} bytes; the format allows at most {PATH_MAX_SIZE - 1}")
    return raw


def _seal_metadata(kdk: bytes, meta: MetaPlain, flags: int = 0) -> tuple[bytes, bytes]:
    """A fresh metadata node (new KDF nonce, hence new key) and its MAC."""
    nonce = os.urandom(NONCE_SIZE)
    key = crypto.derive_metadata_key(kdk, nonce)
    sealed = bytearray(ENC_SIZE + MAC_SIZE)
    crypto.seal(key, meta.pack(), sealed)
    mac = bytes(sealed[ENC_SIZE:])
    header = Header(MAGIC, MAJOR_VERSION, MINOR_VERSION, nonce, mac, flags).pack()
    node = header + bytes(sealed[:ENC_SIZE])
    return node + bytes(NODE_SIZE - len(node)), mac


def read_header(host_path: str) -> Header:
    """The plaintext header of a protected file, unverified (no key needed).

    A volume layer can compare ``Header.mac`` with the root MAC it recorded.
    """
    with open(host_path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise FileIntegrityError(f"{host_path}: too short to be a protected file")
    return Header(*HEADER.unpack(raw))


def bound_path(host_path: str | os.PathLike[str], key: bytes) -> str:
    """The logical path a protected file is bound to (its metadata is checked on the way)."""
    pf = ProtectedFile()
    pf._kdk = bytes(key)
    with open(host_path, "rb") as f:
        node0 = f.read(NODE_SIZE)
    if len(node0) < NODE_SIZE:
        raise FileIntegrityError(f"{os.fspath(host_path)}: too short to be a protected file")
    meta = pf._decrypt_metadata(node0, Header(*HEADER.unpack_from(node0)))
    return meta.path.decode("utf-8", "replace")


class ProtectedFile:
    """An open protected file. Use :meth:`open`; close it (or use ``with``)."""

    def __init__(self) -> None:  # use ProtectedFile.open()
        self._fd = -1
        self._closed = True
        self._two_phase = False

    # -- opening --------------------------------------------------------------

    @classmethod
    def open(
        cls,
        host_path: str | os.PathLike[str],
        key: bytes,
        logical_path: str,
        mode: str = "r",
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        durable: bool = True,
        expected_root_mac: bytes | None = None,
        two_phase: bool = False,
    ) -> ProtectedFile:
        """Open (``r``, ``r+``) or create (``w`` replaces, ``x`` fails if present).

        ``key`` is the 16-byte key-derivation key of the volume; ``logical_path``
        is the path the file is bound to (relative to its volume). ``durable``
        orders commits with fsync so they also survive power loss, not just a
        killed process. ``expected_root_mac`` (from a volume layer) rejects
        any other version of the file, which the file alone cannot do.

        ``two_phase`` lets a volume commit many files at once: a commit then
        writes the new state but keeps the undo log (and the has-pending-write
        flag), so the file can still return to the state of the volume's last
        commit, until the volume has recorded the new state and calls
        :meth:`finish`.
        """
        if mode not in MODES:
            raise ProtectedFileError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_SIZE:
            raise ProtectedFileError("the key must be 16 bytes")
        path_bytes = _encode_path(logical_path)
        host_path = os.fspath(host_path)
        if mode in ("w", "x"):
            _create(host_path, bytes(key), path_bytes, exclusive=(mode == "x"))
        self = cls()
        self._two_phase = two_phase
        self._open_existing(
            host_path,
            bytes(key),
            logical_path,
            path_bytes,
            writable=(mode != "r"),
            cache_bytes=cache_bytes,
            durable=durable,
        )
        if expected_root_mac is not None and not crypto.macs_equal(self._mac, bytes(expected_root_mac)):
            self._release()
            raise FileIntegrityError(
                f"root MAC mismatch: {logical_path!r} is not the version the volume recorded (rolled back or replaced)"
            )
        return self

    def _open_existing(
        self,
        host_path: str,
        kdk: bytes,
        logical_path: str,
        path_bytes: bytes,
        writable: bool,
        cache_bytes: int,
        durable: bool,
    ) -> None:
        self._host_path = host_path
        self._kdk = kdk
        self._writable = writable
        self._durable = durable
        self._failed: FileIntegrityError | None = None
        try:
            self._fd = os.open(host_path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ProtectedFileError(f"{host_path}: no such file", "create it with mode 'w' or 'x'") from None
        self._closed = False
        try:
            self._lock()
            node0 = self._read_metadata_node()
            header = Header(*HEADER.unpack_from(node0))
            if header.flags & HAS_PENDING_WRITE:
                journal.recover(host_path)
                node0 = self._read_metadata_node()
                header = Header(*HEADER.unpack_from(node0))
            meta = self._decrypt_metadata(node0, header)
            if meta.path != path_bytes:
                bound = meta.path.decode("utf-8", "replace")
                raise FileIntegrityError(
                    f"path mismatch: file bound to {bound!r}, opened as {logical_path!r}",
                    "a protected file cannot be moved or copied to another path; use rename() to re-bind it",
                )
            need = node_count(meta.size)
            have = os.fstat(self._fd).st_size // NODE_SIZE
            if have < need:
                raise FileIntegrityError(f"file truncated: {have} nodes on disk, its size {meta.size} needs {need}")
            self._meta = meta
            self._mac = header.mac
            self._disk_meta = node0  # node 0 of the state the undo log returns to
            self._node0 = node0  # node 0 as last written
            self._committed_nodes = need
            self._dirty = False
            self._journal = journal.UndoLog(journal.recovery_path(host_path), durable)
            self._writer: AsyncWriter | None = None
            self._tree = Tree(
                self._fd,
                meta.size,
                meta.root_key,
                meta.root_mac,
                max(1, cache_bytes // NODE_SIZE),
                self._write_back,
                self._drain,
            )
        except BaseException:
            self._release()
            raise

    def _lock(self) -> None:
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_EX if self._writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ProtectedFileError(
                    f"{self._host_path}: already open for writing elsewhere"
                    if not self._writable
                    else f"{self._host_path}: already open elsewhere"
                ) from None
            raise

    def _read_metadata_node(self) -> bytes:
        size = os.fstat(self._fd).st_size
        if size < NODE_SIZE:
            raise FileIntegrityError(f"file truncated: {size} bytes, a protected file has at least {NODE_SIZE}")
        if size % NODE_SIZE:
            raise FileIntegrityError(f"file size {size} is not a multiple of {NODE_SIZE} (truncated or extended)")
        return os.pread(self._fd, NODE_SIZE, 0)

    def _decrypt_metadata(self, node0: bytes, header: Header) -> MetaPlain:
        if header.magic != MAGIC:
            raise FileIntegrityError("not a protected file: bad magic (expected GRAFS_PF)")
        if header.major != MAJOR_VERSION or header.minor != MINOR_VERSION:
            raise FileIntegrityError(
                f"unsupported protected-file version {header.major}.{header.minor} "
                f"(this reads {MAJOR_VERSION}.{MINOR_VERSION}; the header is not MACed, so "
                "unknown values are refused)"
            )
        if header.flags & ~KNOWN_FLAGS:
            raise FileIntegrityError(f"unknown feature flags 0x{header.flags:02x} in metadata")
        if any(node0[PAD_OFFSET:]):
            raise FileIntegrityError("metadata node padding is not zero")
        key = crypto.derive_metadata_key(self._kdk, header.nonce)
        plain = bytearray(ENC_SIZE)
        sealed = node0[ENC_OFFSET:PAD_OFFSET] + header.mac
        try:
            crypto.open_sealed(key, sealed, plain)
        except crypto.InvalidTag:
            raise FileIntegrityError(
                "metadata MAC mismatch (wrong key, or the metadata node was tampered with; "
                "the format cannot tell which)",
                "check the volume key; if it is right, the file was modified outside Cove",
            ) from None
        return unpack_meta_plain(plain)

    # -- content ----------------------------------------------------------------

    def size(self) -> int:
        """Content size in bytes."""
        self._check()
        return self._tree.size

    @property
    def logical_path(self) -> str:
        return self._meta.path.decode("utf-8")

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset``; short only at the end of the file."""
        self._check()
        if offset < 0 or size < 0:
            raise ProtectedFileError("offset and size must be non-negative")
        end = min(offset + size, self._tree.size)
        if offset >= end:
            return b""
        parts: list[memoryview | bytes] = []
        if offset < MD_USER_DATA_SIZE:
            stop = min(end, MD_USER_DATA_SIZE)
            parts.append(memoryview(self._meta.data)[offset:stop])
            offset = stop
        if offset < end:
            self._guard(self._tree.read_into, parts, offset, end)
        return b"".join(parts)

    def write(self, offset: int, data: crypto.Buffer) -> int:
        """Write ``data`` at ``offset``; a gap past the end reads as zeros."""
        self._check(write=True)
        if offset < 0:
            raise ProtectedFileError("offset must be non-negative")
        src = memoryview(data).cast("B")
        if not len(src):
            return 0
        if offset > self._tree.size:
            self._fill(self._tree.size, offset, None)
        self._fill(offset, offset + len(src), src)
        return len(src)

    def truncate(self, size: int) -> None:
        """Set the content size: shrink, or extend with zeros."""
        self._check(write=True)
        if size < 0:
            raise ProtectedFileError("size must be non-negative")
        if size > self._tree.size:
            self._fill(self._tree.size, size, None)
        elif size < self._tree.size:
            self._tree.shrink(size)
            self._meta.size = size
            self._dirty = True

    def _fill(self, start: int, end: int, src: memoryview | None) -> None:
        """Write src (or zeros) over [start, end), growing the size as it goes."""
        pos = 0
        if start < MD_USER_DATA_SIZE:
            stop = min(end, MD_USER_DATA_SIZE)
            n = stop - start
            self._meta.data[start:stop] = src[:n] if src is not None else bytes(n)
            pos, start = n, stop
            if start > self._tree.size:
                self._tree.size = start
        if start < end:
            self._guard(self._tree.write_from, start, src[pos:] if src is not None else None, end - start)
        self._meta.size = self._tree.size
        self._dirty = True

    # -- commit -------------------------------------------------------------------

    def flush(self) -> None:
        """Commit: after this, a crash leaves the file in this state or a later one."""
        self._check()
        if self._writable:
            self._commit(self._durable)

    def fsync(self) -> None:
        """Commit and make the state durable (survives power loss)."""
        self._check()
        if self._writable:
            self._commit(True)
            os.fsync(self._fd)

    def rename(self, new_logical_path: str) -> None:
        """Re-bind the file to a new logical path (rewrites the metadata node).

        Moving the host file is the caller's job; do it right after.
        """
        self._check(write=True)
        self._meta.path = _encode_path(new_logical_path)
        self._dirty = True
        self._commit(self._durable)

    def root_mac(self) -> bytes:
        """MAC of the metadata node of the committed state; it covers the whole file.

        Pending changes are committed first so the MAC reflects the content.
        """
        self._check()
        if self._writable and self._dirty_any():
            self._commit(self._durable)
        return self._mac

    def _dirty_any(self) -> bool:
        return self._dirty or self._tree.root.dirty or bool(self._tree.dirty_nodes())

    def _write_back(self, runs: list[Run], durable: bool | None = None) -> None:
        """Overwrite nodes in place, with their committed content logged first."""
        durable = self._durable if durable is None else durable
        if not self._journal.active:
            self._journal.durable = durable
            self._journal.begin(self._disk_meta)
            flagged = bytearray(self._disk_meta[: HEADER.size])
            flagged[-1] |= HAS_PENDING_WRITE
            os.pwrite(self._fd, flagged, 0)
            if durable:
                os.fsync(self._fd)
        self._journal.durable = durable
        old = [
            first + i
            for first, view in runs
            for i in range(len(view) // NODE_SIZE)
            if first + i < self._committed_nodes
        ]
        self._journal.save(self._fd, old)
        if sum(len(view) for _, view in runs) >= ASYNC_WRITE_BYTES:
            if self._writer is None:
                self._writer = AsyncWriter(self._fd)
            for first, view in runs:
                self._writer.write(view, first * NODE_SIZE)
        else:
            self._drain()
            for first, view in runs:
                os.pwrite(self._fd, view, first * NODE_SIZE)

    def _drain(self) -> None:
        """Every write handed to the writer thread is on its way to the disk."""
        if self._writer is not None:
            self._writer.drain()

    def _commit(self, durable: bool) -> None:
        if not self._dirty_any():
            return
        tree = self._tree

        def work() -> None:
            runs = tree.seal(tree.dirty_nodes(), with_root=tree.size > MD_USER_DATA_SIZE)
            self._write_back(runs, durable)
            self._drain()
            if durable:
                os.fsync(self._fd)
            self._meta.root_key, self._meta.root_mac = tree.root_key, tree.root_mac
            # two-phase: the new state stays flagged until the volume records it
            node0, mac = _seal_metadata(self._kdk, self._meta, HAS_PENDING_WRITE if self._two_phase else 0)
            os.pwrite(self._fd, node0, 0)  # the commit point (two-phase: of this file alone)
            if durable:
                os.fsync(self._fd)
            self._node0, self._mac = node0, mac
            self._dirty = False
            if not self._two_phase:
                self._end_transaction()

        self._guard(work)

    def _end_transaction(self) -> None:
        """The committed state is final: trim, forget the undo log."""
        need = node_count(self._meta.size)
        if os.fstat(self._fd).st_size > need * NODE_SIZE:
            os.ftruncate(self._fd, need * NODE_SIZE)
        self._journal.end()
        self._disk_meta = self._node0
        self._committed_nodes = need

    @property
    def prepared(self) -> bool:
        """Two-phase: a state is committed that :meth:`finish` has not made final yet."""
        return self._two_phase and self._journal.active

    def finish(self) -> None:
        """Two-phase: the volume recorded the committed state; drop the undo log.

        Clearing the flag needs no fsync: a volume that finds the flag still
        set on the state it recorded clears it again (see cove.fs.recovery).
        """
        self._check()
        if not self._journal.active:
            return
        if self._dirty_any():
            raise ProtectedFileError("finish() with uncommitted changes", "commit (flush) first")

        def work() -> None:
            flags = self._node0[HEADER.size - 1] & ~HAS_PENDING_WRITE
            self._node0 = self._node0[: HEADER.size - 1] + bytes([flags]) + self._node0[HEADER.size :]
            os.pwrite(self._fd, self._node0[: HEADER.size], 0)
            self._end_transaction()

        self._guard(work)

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Commit pending changes (unless the file failed a check) and close."""
        if self._closed:
            return
        try:
            if self._writable and self._failed is None:
                self._commit(self._durable)
        finally:
            self._release()

    def abandon(self) -> None:
        """Close without committing; the undo log stays, so the file can return to its last commit."""
        self._release()

    def _release(self) -> None:
        writer, self._writer = getattr(self, "_writer", None), None
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass  # the commit that needed these writes already failed; as after a crash
        journal_ = getattr(self, "_journal", None)
        if journal_ is not None:
            journal_.close(remove=not journal_.active and self._writable)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._closed = True

    def __enter__(self) -> ProtectedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and self._fd >= 0:
            # no commit from a finalizer: uncommitted changes are lost, as in a crash
            writer = getattr(self, "_writer", None)
            if writer is not None:  # its thread must be done with the descriptor before it closes
                try:
                    writer.close()
                except OSError:
                    pass
            journal_ = getattr(self, "_journal", None)
            if journal_ is not None:
                journal_.close(remove=False)
            os.close(self._fd)

    def _check(self, write: bool = False) -> None:
        if self._closed:
            raise ProtectedFileError("the protected file is closed")
        if self._failed is not None:
            raise FileIntegrityError(f"file failed an earlier check: {self._failed.message}")
        if write and not self._writable:
            raise ProtectedFileError("the protected file is open read-only", "open it with 'r+'")

    def _guard(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn``; an integrity failure poisons the handle for good."""
        try:
            return fn(*args, **kwargs)
        except FileIntegrityError as e:
            self._failed = e
            raise


def _create(host_path: str, kdk: bytes, path_bytes: bytes, exclusive: bool) -> None:
    """Write an empty protected file under a temporary name, then move it in place."""
    meta = MetaPlain(path_bytes, 0, bytes(KEY_SIZE), bytes(MAC_SIZE), bytearray(MD_USER_DATA_SIZE))
    node0, _ = _seal_metadata(kdk, meta)
    directory = os.path.dirname(os.path.abspath(host_path))
    if exclusive and os.path.lexists(host_path):
        raise ProtectedFileError(f"{host_path}: already exists", "open it with 'r+'")
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".cove-new", dir=directory)
    try:
        os.write(fd, node0)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if exclusive:
            try:
                os.link(tmp, host_path)
            except FileExistsError:
                raise ProtectedFileError(f"{host_path}: already exists", "open it with 'r+'") from None
            os.unlink(tmp)
        else:
            os.replace(tmp, host_path)
        try:
            os.unlink(journal.recovery_path(host_path))
        except FileNotFoundError:
            pass
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)
