"""A volume: a folder of protected files under one authenticated, rollback-anchored root.

:class:`Volume` opens, commits and closes a volume and runs the POSIX-like
operations (lookup, mkdir, rename, setattr, read/write/truncate, walk,
verify) on its index. The index itself is :mod:`cove.fs.index`; the root
file, the key header and host file IDs are :mod:`cove.fs.volume_format`;
crash recovery of host files on open is :mod:`cove.fs.recovery`.

The host sees neither names nor the tree, only opaque IDs, sizes to within
4 KiB and access patterns. Anything the host adds under ``files/`` is not in
the index and so cannot be seen; a file replaced by an older version of
itself, by another file, or deleted fails its root MAC (or is missing) and
reads fail; a whole volume rolled back fails the anchor (:mod:`cove.fs.anchor`).

Commit (everything since the last commit becomes durable at once):

1. every changed file is committed in two-phase mode: its new state is
   written but its undo log kept, and its metadata node keeps the
   has-pending-write flag;
2. the new root (version + 1) is written to ``root.next`` and fsynced;
3. the anchor advances to (version + 1, SHA-256 of root.next): the commit
   point;
4. ``root.next`` replaces ``root``; the files' flags are cleared and their
   logs dropped; files unlinked before the commit are deleted.

Opening resolves any crash: the anchor names exactly one root (``root`` or
``root.next``); a file whose undo log returns it to the MAC that root
records is rolled back, a file already at that MAC has its flag cleared.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cove.errors import CoveError
from cove.fs import anchor as anchor_mod
from cove.fs import journal, recovery
from cove.fs.errors import FileIntegrityError, ProtectedFileError, VolumeError, VolumeIntegrityError
from cove.fs.index import KeyFor, KeyPolicy, Node
from cove.fs.layout import NODE_SIZE, node_count
from cove.fs.crypto import Buffer
from cove.fs.protected_file import ProtectedFile
from cove.fs.volume_format import FILES, FORMAT, NEXT, ROOT, decode_root, encode_root, kdf, new_id, wrap_key

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_FILE_CACHE = 1 << 20
NAME_MAX = 255


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _errno(code: int, what: str = "") -> OSError:
    return OSError(code, os.strerror(code), what)


class Volume:
    """An open volume. Use :meth:`create` or :meth:`open`; :meth:`close` when done."""

    def __init__(self) -> None:
        self._lock_fd = -1

    # -- opening ----------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        kek: bytes,
        *,
        label: str,
        policy: KeyPolicy,
        anchor: str = "auto",
        durable: bool = True,
        cache_bytes: int = DEFAULT_FILE_CACHE,
        uid: int = 0,
        gid: int = 0,
        home: str | None = None,
    ) -> Volume:
        """Make a new, empty volume in ``path`` (missing or empty) and open it.

        ``home`` is where the volume will live if it is built elsewhere and
        moved there (the platform remembers volumes by that path).
        """
        path = os.path.abspath(os.fspath(path))
        os.makedirs(path, mode=0o700, exist_ok=True)
        leftovers = [n for n in os.listdir(path) if n not in (FILES, NEXT)]
        if leftovers:
            raise VolumeError(f"{path} is not empty", "a new volume needs an empty or missing folder")
        self = cls()
        self._lock(path)
        try:
            volume_id = os.urandom(16)
            vmk = os.urandom(32)
            kind = anchor_mod.choose_kind(anchor)
            store = anchor_mod.open_store({"kind": kind}, volume_id, kdf(vmk, volume_id, b"anchor", 16), home or path)
            first = store.create()
            header = {
                "format": FORMAT,
                "id": volume_id,
                "label": label,
                "key": policy.to_cbor(),
                "wrapped": wrap_key(kek, vmk, volume_id, label, policy),
                "anchor": store.params(),
            }
            self._setup(path, header, vmk, store, writable=True, durable=durable, cache_bytes=cache_bytes)
            os.makedirs(os.path.join(path, FILES), mode=0o700, exist_ok=True)
            self.version = first.version
            root = Node("d", stat.S_IFDIR | 0o755, uid, gid)
            self._load_tree(root)
            self.dirty = True
            self.commit()
        except BaseException:
            self._unlock()
            raise
        return self

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        key_for: KeyFor | bytes,
        *,
        label: str | None = None,
        writable: bool = True,
        durable: bool = True,
        cache_bytes: int = DEFAULT_FILE_CACHE,
        check_anchor: bool = True,
    ) -> Volume:
        """Open an existing volume, resolving an interrupted commit.

        ``key_for(policy)`` returns the KEK for the policy in the header (or
        pass the KEK itself). ``label``, if given, must equal the volume's.
        ``check_anchor=False`` skips the rollback check (offline inspection of
        a volume from another platform only).
        """
        path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(path):
            raise VolumeError(f"{path}: no such volume folder")
        if not os.path.exists(os.path.join(path, ROOT)) and not os.path.exists(os.path.join(path, NEXT)):
            raise VolumeError(
                f"{path} is not a Cove volume (no root file)",
                "create one with `cove fs encrypt`, or let an encrypted mount create it",
            )
        self = cls()
        self._lock(path, exclusive=writable)
        try:
            self._open(path, key_for, label, writable, durable, cache_bytes, check_anchor)
        except BaseException:
            self._unlock()
            raise
        return self

    def _lock(self, path: str, exclusive: bool = True) -> None:
        """The writer's lock (exclusive), or a reader's (shared: readers coexist; a writer is refused meanwhile)."""
        self._lock_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._lock_fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            self._unlock()
            raise VolumeError(
                f"volume {path} is in use (mounted by a running enclave or another tool)", "stop it first"
            ) from None

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _setup(
        self,
        path: str,
        header: dict[str, Any],
        vmk: bytes,
        store: anchor_mod.AnchorStore,
        writable: bool,
        durable: bool,
        cache_bytes: int,
    ) -> None:
        self.path = path
        self.header = header
        self.id: bytes = header["id"]
        self.label: str = header["label"]
        self.policy = KeyPolicy.from_cbor(header["key"])
        self._vmk = vmk
        self._file_key = kdf(vmk, self.id, b"files", 16)
        self._index = AESGCM(kdf(vmk, self.id, b"index", 32))
        self._name_key = kdf(vmk, self.id, b"names", 32)
        self.store = store
        self.writable = writable
        self.durable = durable
        self.cache_bytes = cache_bytes
        self.drop: set[str] = set()
        self.problems: list[str] = []
        self.recovered: list[str] = []
        self.dirty = False
        self._inodes: dict[int, Node] = {}
        self._next_ino = 1
        self._handles: dict[str, Node] = {}

    def _open(
        self,
        path: str,
        key_for: KeyFor | bytes,
        label: str | None,
        writable: bool,
        durable: bool,
        cache_bytes: int,
        check_anchor: bool,
    ) -> None:
        candidates = []
        first_error: CoveError | None = None
        for name in (ROOT, NEXT):
            try:
                data = Path(path, name).read_bytes()
            except FileNotFoundError:
                continue
            try:
                candidates.append((name, data) + decode_root(data, key_for))
            except CoveError as exc:
                first_error = first_error or exc
        if not candidates:  # Volume.open checked that one exists; it went since
            raise first_error or VolumeError(f"{path} is not a Cove volume (no root file)")
        header = candidates[0][2]
        store = anchor_mod.open_store(
            header.get("anchor", {}), header["id"], kdf(candidates[0][3], header["id"], b"anchor", 16), path
        )
        chosen = None
        if store.kind == "none" or not check_anchor:
            chosen = next((c for c in candidates if c[0] == ROOT), None)
            if chosen is None:
                raise VolumeIntegrityError("volume root is missing (only an unfinished commit is there)")
        else:
            trusted = store.read()
            for candidate in candidates:
                digest = hashlib.sha256(candidate[1]).digest()
                if hmac.compare_digest(digest, trusted.digest) and candidate[4].get("version") == trusted.version:
                    chosen = candidate
            if chosen is None:
                versions = sorted({c[4].get("version") for c in candidates}, key=lambda v: v or 0)
                newest = versions[-1]
                if newest is not None and newest < trusted.version:
                    raise VolumeIntegrityError(
                        f"volume rolled back: its root is version {newest}, the {store.kind} anchor "
                        f"holds version {trusted.version}",
                        "an older copy of the volume was put back; restore the latest one",
                    )
                raise VolumeIntegrityError(
                    f"volume root does not match its {store.kind} anchor (version {trusted.version})",
                    "the volume was replaced or tampered with",
                )
        name, data, header, vmk, body = chosen
        if label is not None and header["label"] != label:
            raise VolumeError(
                f"this volume belongs to {header['label']!r}, not {label!r}",
                "each encrypted mount has its own volume; check the source folder",
            )
        self._setup(path, header, vmk, store, writable, durable, cache_bytes)
        self.version = body["version"]
        # A read-only open changes nothing on disk: it reads the chosen root where it is and
        # leaves an interrupted commit for the next writable open to finish.
        if not writable:
            pass
        elif name == NEXT:  # the anchor moved before the rename: finish that commit
            os.replace(os.path.join(path, NEXT), os.path.join(path, ROOT))
            _fsync_dir(path)
        elif os.path.exists(os.path.join(path, NEXT)):
            os.unlink(os.path.join(path, NEXT))
        self.drop = set(body.get("drop", ()))
        self._load_tree(Node.from_cbor(body["tree"]))
        problems, recovered = recovery.scan(
            os.path.join(path, FILES), self.ids, self.drop, self.version, self._name_key, read_only=not writable
        )
        self.problems += problems
        self.recovered += recovered

    def _load_tree(self, root: Node) -> None:
        self.root = root
        root.parent, root.name = None, b""
        self._inodes.clear()
        self._next_ino = 1
        self.ids: dict[str, Node] = {}

        def visit(node: Node) -> None:
            self.assign_inode(node)
            if node.kind == "f" and node.id is not None:  # an index file always has its id
                self.ids[node.id] = node
            elif node.kind == "d":
                for child in node.entries.values():
                    visit(child)

        visit(root)

    def assign_inode(self, node: Node) -> None:
        """Give a node built outside the volume (an in-memory mount point) its inode number."""
        node.ino = self._next_ino
        self._next_ino += 1
        self._inodes[node.ino] = node

    # -- host files ---------------------------------------------------------------

    def host_path(self, file_id: str) -> str:
        return os.path.join(self.path, FILES, file_id.split("-")[1][:2], file_id)

    # -- commit --------------------------------------------------------------------

    def commit(self) -> None:
        """Make every change since the last commit durable, all at once."""
        if not self.writable:
            return
        for node in list(self._handles.values()):
            if node.dirty and node.linked:
                node.dirty = False
                self.dirty = True
                handle = node.handle
                assert handle is not None  # a node is in _handles while its file is open
                try:
                    self._guarded(node, handle.flush)
                except FileIntegrityError as exc:  # a file that failed a check keeps its last state
                    self.problems.append(exc.message)
                    continue
                node.mac, node.size = handle.root_mac(), handle.size()
        if not self.dirty:
            return
        version = self.version + 1
        data = encode_root(
            self.header, {"version": version, "tree": self.root.to_cbor(), "drop": sorted(self.drop)}, self._index
        )
        next_path = os.path.join(self.path, NEXT)
        fd = os.open(next_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if self.store.kind != "none":
            if self.durable:
                _fsync_dir(self.path)
            self.store.advance(anchor_mod.Anchor(version, hashlib.sha256(data).digest()))  # commit point
        os.replace(next_path, os.path.join(self.path, ROOT))  # the commit point without an anchor
        if self.durable:
            _fsync_dir(self.path)
        self.version = version
        self.dirty = False
        for node in list(self._handles.values()):
            if node.linked and node.handle is not None and node.handle.prepared:
                self._guarded(node, node.handle.finish)
            if node.opens == 0:
                self._close_handle(node)
        for file_id in sorted(self.drop):
            if file_id not in self._handles:
                recovery.discard(self.host_path(file_id))
                recovery.discard(journal.recovery_path(self.host_path(file_id)))
                self.drop.discard(file_id)

    def close(self) -> None:
        """Commit (if writable) and release everything."""
        if self._lock_fd < 0:
            return
        try:
            if self.writable:
                self.commit()
        finally:
            for node in list(self._handles.values()):
                node.opens = 0
                self._close_handle(node, commit=False)
            self._unlock()

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rewrap(self, kek: bytes, policy: KeyPolicy) -> None:
        """Wrap the volume key under a new KEK (e.g. a sealing key of a higher svn)."""
        self.header = dict(
            self.header, key=policy.to_cbor(), wrapped=wrap_key(kek, self._vmk, self.id, self.label, policy)
        )
        self.policy = policy
        self.dirty = True

    # -- files -----------------------------------------------------------------------

    def _guarded(self, node: Node, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a protected-file call; integrity failures name the file's path."""
        try:
            return fn(*args, **kwargs)
        except FileIntegrityError as exc:
            raise FileIntegrityError(f"{node.path()}: {exc.message}", exc.hint) from None

    def acquire(self, node: Node) -> ProtectedFile:
        """The open protected file behind ``node`` (opened, and checked, if need be)."""
        if node.kind != "f":
            raise _errno(errno.EISDIR if node.kind == "d" else errno.EINVAL)
        if node.handle is None:
            if node.id is None:  # an in-memory mount point has no host file
                raise _errno(errno.EINVAL)
            host = self.host_path(node.id)
            try:
                host_size = os.path.getsize(host)
            except FileNotFoundError:
                raise FileIntegrityError(f"{node.path()}: its host file is missing (deleted from outside)") from None
            if host_size != node_count(node.size) * NODE_SIZE:
                raise FileIntegrityError(
                    f"{node.path()}: its host file has {host_size} bytes, the index "
                    f"records {node.size} content bytes (truncated or extended outside Cove)"
                )
            try:
                node.handle = self._guarded(
                    node,
                    ProtectedFile.open,
                    host,
                    self._file_key,
                    node.id,
                    "r+" if self.writable else "r",
                    cache_bytes=self.cache_bytes,
                    durable=self.durable,
                    expected_root_mac=node.mac,
                    two_phase=True,
                )
            except ProtectedFileError as exc:
                raise FileIntegrityError(f"{node.path()}: {exc.message}") from None
            self._handles[node.id] = node
        node.opens += 1
        return node.handle

    def release(self, node: Node) -> None:
        """One opener is done with the file; close it if nothing needs it any more."""
        node.opens = max(0, node.opens - 1)
        if node.opens == 0 and node.handle is not None and not node.linked:
            # its host file goes after the commit that drops it from the index
            self._close_handle(node, commit=False)
        elif node.opens == 0 and node.handle is not None and not node.dirty and not node.handle.prepared:
            self._close_handle(node)

    def _close_handle(self, node: Node, commit: bool = True) -> None:
        handle, node.handle = node.handle, None
        if node.id is not None:
            self._handles.pop(node.id, None)
        if handle is None:
            return
        if commit and not handle.prepared and not node.dirty:
            handle.close()
        else:  # leave the undo log: the file returns to the volume's committed state
            handle.abandon()

    def read(self, node: Node, offset: int, size: int) -> bytes:
        handle = node.handle or self.acquire(node)
        return self._guarded(node, handle.read, offset, size)

    def write(self, node: Node, offset: int, data: Buffer) -> int:
        self._need_writable()
        handle = node.handle or self.acquire(node)
        written = self._guarded(node, handle.write, offset, data)
        self._touch(node, content=True)
        return written

    def truncate(self, node: Node, size: int) -> None:
        self._need_writable()
        if size == 0 and node.kind == "f" and node.linked and self.file_size(node) > 0:
            self._replace_host_file(node)
            return
        opened = node.handle is None
        handle = self.acquire(node) if node.handle is None else node.handle
        try:
            self._guarded(node, handle.truncate, size)
            self._touch(node, content=True)
        finally:
            if opened:
                self.release(node)

    def _replace_host_file(self, node: Node) -> None:
        """Truncation to zero: a new, empty host file; the old one goes after the next commit.

        Rewriting a file from scratch then needs no undo log: until the commit,
        the old host file is untouched (or recoverable), and the index still
        names it.
        """
        fresh_id, new_handle, new_mac = self._new_host_file()  # first: if this fails, nothing changed
        old_id, old_handle = node.id, node.handle
        assert old_id is not None  # a linked file (truncate checked it is a file)
        node.id, node.handle, node.mac = fresh_id, new_handle, new_mac
        self._handles.pop(old_id, None)
        if old_handle is not None:
            old_handle.abandon()  # keeps its undo log, if it has one: it may still be needed
        self.ids.pop(old_id, None)
        self.ids[fresh_id] = node
        self.drop.add(old_id)
        self._handles[fresh_id] = node
        self._touch(node, content=True)

    def _new_host_file(self) -> tuple[str, ProtectedFile, bytes]:
        """(id, open handle, root MAC) of a new, empty protected file."""
        file_id = new_id(self._name_key, self.version + 1)
        host = self.host_path(file_id)
        os.makedirs(os.path.dirname(host), mode=0o700, exist_ok=True)
        handle = ProtectedFile.open(
            host, self._file_key, file_id, "x", cache_bytes=self.cache_bytes, durable=self.durable, two_phase=True
        )
        return file_id, handle, handle.root_mac()

    def file_size(self, node: Node) -> int:
        if node.kind == "f":
            return node.handle.size() if node.handle is not None else node.size
        if node.kind == "l":
            return len(node.target or b"")
        return NODE_SIZE

    def _touch(self, node: Node, content: bool = False) -> None:
        now = time.time_ns()
        node.ctime = now
        if content:
            node.mtime = now
            node.dirty = node.kind == "f" or node.dirty
        self.dirty = True

    # -- namespace ---------------------------------------------------------------------

    def find_inode(self, ino: int) -> Node | None:
        """The node with inode number ``ino``, or None once it is forgotten."""
        return self._inodes.get(ino)

    @property
    def inode_count(self) -> int:
        return len(self._inodes)

    def has_dirty_handles(self) -> bool:
        """Whether an open file holds writes the next commit must record."""
        return any(n.dirty for n in self._handles.values())

    def inode(self, ino: int) -> Node:
        node = self._inodes.get(ino)
        if node is None:
            raise _errno(errno.ENOENT)
        return node

    def lookup(self, parent: Node, name: bytes) -> Node:
        if parent.kind != "d":
            raise _errno(errno.ENOTDIR)
        if name == b".":
            return parent
        if name == b"..":
            return parent.parent or parent
        node = parent.entries.get(name)
        if node is None:
            raise _errno(errno.ENOENT)
        return node

    def _need_writable(self) -> None:
        if not self.writable:
            raise _errno(errno.EROFS)

    def _check_new(self, parent: Node, name: bytes) -> None:
        self._need_writable()
        if parent.kind != "d":
            raise _errno(errno.ENOTDIR)
        if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
            raise _errno(errno.EINVAL)
        if len(name) > NAME_MAX:
            raise _errno(errno.ENAMETOOLONG)
        if name in parent.entries:
            raise _errno(errno.EEXIST)

    def _link(self, parent: Node, name: bytes, node: Node) -> Node:
        node.parent, node.name = parent, name
        parent.entries[name] = node
        self.assign_inode(node)
        self._touch(parent, content=True)
        return node

    def mkdir(self, parent: Node, name: bytes, mode: int, uid: int = 0, gid: int = 0) -> Node:
        self._check_new(parent, name)
        return self._link(parent, name, Node("d", stat.S_IFDIR | (mode & 0o7777), uid, gid))

    def symlink(self, parent: Node, name: bytes, target: bytes, uid: int = 0, gid: int = 0) -> Node:
        self._check_new(parent, name)
        node = Node("l", stat.S_IFLNK | 0o777, uid, gid)
        node.target = bytes(target)
        return self._link(parent, name, node)

    def create_file(self, parent: Node, name: bytes, mode: int, uid: int = 0, gid: int = 0) -> Node:
        """A new, empty file (not yet opened)."""
        self._check_new(parent, name)
        node = Node("f", stat.S_IFREG | (mode & 0o7777), uid, gid)
        file_id, node.handle, node.mac = self._new_host_file()
        node.id = file_id
        self.ids[file_id] = node
        self._handles[file_id] = node
        node.dirty = True
        return self._link(parent, name, node)

    def _drop(self, node: Node) -> None:
        """Take a node out of the namespace; its host file goes after the next commit."""
        node.linked = False
        if node.kind == "f" and node.id is not None:  # not an in-memory mount point
            self.ids.pop(node.id, None)
            self.drop.add(node.id)

    def unlink(self, parent: Node, name: bytes) -> Node:
        self._need_writable()
        node = self.lookup(parent, name)
        if node.kind == "d":
            raise _errno(errno.EISDIR)
        del parent.entries[name]
        self._drop(node)
        self._touch(parent, content=True)
        return node

    def rmdir(self, parent: Node, name: bytes) -> Node:
        self._need_writable()
        node = self.lookup(parent, name)
        if node.kind != "d":
            raise _errno(errno.ENOTDIR)
        if node.entries:
            raise _errno(errno.ENOTEMPTY)
        del parent.entries[name]
        node.linked = False
        self._touch(parent, content=True)
        return node

    def rename(
        self, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes, flags: int = 0
    ) -> Node | None:
        """Move an entry; returns the node it replaced (now unlinked), if any.

        ``flags``: os.RENAME_NOREPLACE (1) or RENAME_EXCHANGE (2), as renameat2.
        """
        self._need_writable()
        node = self.lookup(old_parent, old_name)
        if new_parent.kind != "d":
            raise _errno(errno.ENOTDIR)
        if not new_name or b"/" in new_name or new_name in (b".", b".."):
            raise _errno(errno.EINVAL)
        if len(new_name) > NAME_MAX:
            raise _errno(errno.ENAMETOOLONG)
        ancestor: Node | None = new_parent
        while ancestor is not None:  # a folder cannot move into itself
            if ancestor is node:
                raise _errno(errno.EINVAL)
            ancestor = ancestor.parent
        target = new_parent.entries.get(new_name)
        if flags & 2:  # exchange
            if target is None:
                raise _errno(errno.ENOENT)
            old_parent.entries[old_name], new_parent.entries[new_name] = target, node
            target.parent, target.name = old_parent, old_name
            node.parent, node.name = new_parent, new_name
            self._touch(old_parent, content=True)
            self._touch(new_parent, content=True)
            return None
        if target is node:
            return None
        if target is not None:
            if flags & 1:
                raise _errno(errno.EEXIST)
            if target.kind == "d":
                if node.kind != "d":
                    raise _errno(errno.EISDIR)
                if target.entries:
                    raise _errno(errno.ENOTEMPTY)
            elif node.kind == "d":
                raise _errno(errno.ENOTDIR)
            self._drop(target)
        del old_parent.entries[old_name]
        new_parent.entries[new_name] = node
        node.parent, node.name = new_parent, new_name
        node.ctime = time.time_ns()
        self._touch(old_parent, content=True)
        self._touch(new_parent, content=True)
        return target

    def setattr(
        self,
        node: Node,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        mtime: int | None = None,
    ) -> None:
        self._need_writable()
        if size is not None:
            if node.kind != "f":
                raise _errno(errno.EISDIR if node.kind == "d" else errno.EINVAL)
            self.truncate(node, size)
        if mode is not None:
            node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
        if uid is not None:
            node.uid = uid
        if gid is not None:
            node.gid = gid
        if mtime is not None:
            node.mtime = mtime
        self._touch(node)

    def forget(self, node: Node) -> None:
        """The kernel no longer knows this inode (FUSE forget)."""
        if not node.linked and node.opens == 0:
            self._inodes.pop(node.ino, None)

    # -- paths (the library and the offline tools) --------------------------------------

    def resolve(self, path: str) -> Node:
        node = self.root
        for part in path.strip("/").split("/"):
            if part:
                node = self.lookup(node, part.encode())
        return node

    def _parent_of(self, path: str, create: bool = False) -> tuple[Node, bytes]:
        parts = [p for p in path.strip("/").split("/") if p]
        if not parts:
            raise _errno(errno.EINVAL, path)
        node = self.root
        for part in parts[:-1]:
            try:
                node = self.lookup(node, part.encode())
            except FileNotFoundError:
                if not create:
                    raise
                node = self.mkdir(node, part.encode(), 0o755)
        return node, parts[-1].encode()

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> Node:
        """Create or replace a file with ``data`` (parents are created)."""
        parent, name = self._parent_of(path, create=True)
        node = parent.entries.get(name)
        if node is None:
            node = self.create_file(parent, name, mode)
            node.opens += 1
        else:
            self.acquire(node)
            self.truncate(node, 0)
        try:
            self.write(node, 0, data)
        finally:
            self.release(node)
        return node

    def read_file(self, path: str) -> bytes:
        node = self.resolve(path)
        handle = self.acquire(node)
        try:
            return self._guarded(node, handle.read, 0, handle.size())
        finally:
            self.release(node)

    def makedirs(self, path: str, mode: int = 0o755) -> Node:
        node = self.root
        for part in [p for p in path.strip("/").split("/") if p]:
            try:
                node = self.lookup(node, part.encode())
            except FileNotFoundError:
                node = self.mkdir(node, part.encode(), mode)
        return node

    def walk(self, start: Node | None = None) -> Iterator[tuple[str, Node]]:
        """(path, node) of every entry below ``start`` (the root), folders before their content;
        paths are relative to ``start``."""
        yield from self._walk(self.root if start is None else start, "")

    def _walk(self, node: Node, prefix: str) -> Iterator[tuple[str, Node]]:
        for name, child in sorted(node.entries.items()):
            path = f"{prefix}/{name.decode('utf-8', 'surrogateescape')}"
            yield path, child
            if child.kind == "d":
                yield from self._walk(child, path)

    def verify(self, progress: Callable[[int], None] | None = None) -> list[str]:
        """Read every file through its MAC tree; the list of problems (empty if none)."""
        problems = list(self.problems)
        for path, node in self._walk(self.root, ""):
            if node.kind != "f":
                continue
            try:
                handle = self.acquire(node)
                try:
                    size, offset = handle.size(), 0
                    while offset < size:
                        chunk = self._guarded(node, handle.read, offset, 1 << 20)
                        offset += len(chunk)
                        if progress:
                            progress(len(chunk))
                    if size != node.size and not node.dirty:
                        problems.append(f"{path}: size {size} differs from the index ({node.size})")
                finally:
                    self.release(node)
            except FileIntegrityError as exc:
                if exc.message not in problems:
                    problems.append(exc.message)
        return problems
