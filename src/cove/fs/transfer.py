"""Copying between plain files and protected files or volumes (the offline tools, image encryption).

Every function here writes its result under a temporary name next to the
destination and renames it into place only when everything was written and
checked, so a failure (a tampered input, a full disk, Ctrl-C) leaves no half
result behind.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from cove.errors import CoveError
from cove.fs.index import KeyPolicy, Node
from cove.fs.protected_file import ProtectedFile, bound_path
from cove.fs.volume import Volume
from cove.fs.volume_format import NEXT, ROOT

CHUNK = 1 << 20
Progress = Callable[[int], None]


class TransferError(CoveError):
    """Input or output of an offline tool is not usable."""


def is_volume(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / ROOT).exists() or (path / NEXT).exists())


def _temp_beside(dest: Path, directory: bool) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        return Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".cove-tmp", dir=dest.parent))
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".cove-tmp", dir=dest.parent)
    os.close(fd)
    os.unlink(name)
    return Path(name)


def _refuse_existing(dest: Path, force: bool) -> None:
    if os.path.lexists(dest) and not force:
        raise TransferError(f"{dest} already exists", "choose another output, or pass --force")


def _place(tmp: Path, dest: Path, force: bool) -> None:
    if os.path.lexists(dest):
        if not force:
            raise TransferError(f"{dest} already exists", "choose another output, or pass --force")
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
    os.replace(tmp, dest)


def _discard(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        for path in (tmp, Path(str(tmp) + ".gramine.recovery")):
            try:
                path.unlink()
            except FileNotFoundError:
                pass


def encrypt_file(
    src: Path, dest: Path, key: bytes, logical_path: str, force: bool = False, progress: Progress | None = None
) -> None:
    """A plain file as one protected file bound to ``logical_path`` (as gramine-sgx-pf-crypt)."""
    _refuse_existing(dest, force)
    tmp = _temp_beside(dest, directory=False)
    try:
        with open(src, "rb") as plain, ProtectedFile.open(tmp, key, logical_path, "x", durable=False) as pf:
            offset = 0
            while chunk := plain.read(CHUNK):
                pf.write(offset, chunk)
                offset += len(chunk)
                if progress:
                    progress(len(chunk))
            pf.fsync()
        _place(tmp, dest, force)
    except BaseException:
        _discard(tmp)
        raise


def decrypt_file(
    src: Path,
    dest: Path,
    key: bytes,
    logical_path: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> str:
    """A protected file back to plain bytes; returns the path it is bound to."""
    _refuse_existing(dest, force)
    logical = logical_path if logical_path is not None else bound_path(src, key)
    tmp = _temp_beside(dest, directory=False)
    try:
        with ProtectedFile.open(src, key, logical, "r") as pf, open(tmp, "wb") as out:
            size, offset = pf.size(), 0
            while offset < size:
                chunk = pf.read(offset, CHUNK)
                out.write(chunk)
                offset += len(chunk)
                if progress:
                    progress(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        _place(tmp, dest, force)
    except BaseException:
        _discard(tmp)
        raise
    return logical


def verify_file(src: Path, key: bytes, logical_path: str | None = None) -> tuple[str, int]:
    """Read a protected file through its whole MAC tree; (bound path, size)."""
    logical = logical_path if logical_path is not None else bound_path(src, key)
    with ProtectedFile.open(src, key, logical, "r") as pf:
        size, offset = pf.size(), 0
        while offset < size:
            offset += len(pf.read(offset, CHUNK))
    return logical, size


def import_tree(
    volume: Volume,
    src: Path,
    progress: Progress | None = None,
    check: Callable[[str, bytes], None] | None = None,
    owner: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """Copy a plain folder tree into ``volume`` (modes, times, symlinks); (files, bytes).

    ``check(path, sha256)`` is called with each file's digest (image encryption
    compares it with the signed listing); ``owner`` replaces every uid and gid.
    """
    import hashlib

    files = total = 0

    def visit(folder: Path, node: Node, prefix: str) -> None:
        nonlocal files, total
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            st = entry.stat(follow_symlinks=False)
            uid, gid = owner if owner is not None else (st.st_uid, st.st_gid)
            name = os.fsencode(entry.name)
            rel = f"{prefix}/{entry.name}"
            if stat.S_ISDIR(st.st_mode):
                child = volume.mkdir(node, name, stat.S_IMODE(st.st_mode), uid, gid)
                visit(Path(entry.path), child, rel)
            elif stat.S_ISLNK(st.st_mode):
                child = volume.symlink(node, name, os.fsencode(os.readlink(entry.path)), uid, gid)
            elif stat.S_ISREG(st.st_mode):
                child = volume.create_file(node, name, stat.S_IMODE(st.st_mode), uid, gid)
                child.opens += 1
                digest = hashlib.sha256()
                try:
                    with open(entry.path, "rb") as plain:
                        offset = 0
                        while chunk := plain.read(CHUNK):
                            volume.write(child, offset, chunk)
                            digest.update(chunk)
                            offset += len(chunk)
                            if progress:
                                progress(len(chunk))
                    total += offset
                finally:
                    volume.release(child)
                files += 1
                if check is not None:
                    check(rel, digest.digest())
            else:
                raise TransferError(f"{entry.path} is a special file; a volume holds files, folders and symlinks")
            child.mtime = st.st_mtime_ns
        node.mtime = os.stat(folder).st_mtime_ns

    visit(src, volume.root, "")
    root_stat = os.stat(src)
    volume.root.mode = stat.S_IFDIR | stat.S_IMODE(root_stat.st_mode)
    volume.dirty = True
    return files, total


def export_tree(volume: Volume, dest: Path, force: bool = False, progress: Progress | None = None) -> tuple[int, int]:
    """Write a volume's content to a new plain folder ``dest``; (files, bytes)."""
    _refuse_existing(dest, force)
    tmp = _temp_beside(dest, directory=True)
    files = total = 0
    try:
        dirs: list[tuple[Path, Node]] = []
        for rel, node in volume.walk():
            out = tmp / rel.lstrip("/")
            if node.kind == "d":
                out.mkdir(mode=0o700)
                dirs.append((out, node))
            elif node.kind == "l":
                assert node.target is not None  # a symlink always has its target
                os.symlink(os.fsdecode(node.target), out)
            else:
                handle = volume.acquire(node)
                try:
                    with open(out, "wb") as plain:
                        size, offset = handle.size(), 0
                        while offset < size:
                            chunk = volume.read(node, offset, CHUNK)
                            plain.write(chunk)
                            offset += len(chunk)
                            if progress:
                                progress(len(chunk))
                finally:
                    volume.release(node)
                os.chmod(out, stat.S_IMODE(node.mode))
                os.utime(out, ns=(node.mtime, node.mtime))
                files += 1
                total += size
        for out, node in reversed(dirs):
            os.chmod(out, stat.S_IMODE(node.mode))
            os.utime(out, ns=(node.mtime, node.mtime))
        os.chmod(tmp, stat.S_IMODE(volume.root.mode))
        _place(tmp, dest, force)
    except BaseException:
        _discard(tmp)
        raise
    return files, total


def new_volume_from(
    src: Path,
    dest: Path,
    kek: bytes,
    *,
    label: str,
    policy: KeyPolicy,
    anchor: str,
    force: bool = False,
    progress: Progress | None = None,
    check: Callable[[str, bytes], None] | None = None,
    owner: tuple[int, int] | None = None,
) -> tuple[int, int, str]:
    """A new volume at ``dest`` holding a copy of the plain folder ``src``; (files, bytes, anchor kind)."""
    _refuse_existing(dest, force)
    tmp = _temp_beside(dest, directory=True)
    store = None
    try:
        with Volume.create(
            tmp, kek, label=label, policy=policy, anchor=anchor, durable=False, home=str(dest.absolute())
        ) as volume:
            store = volume.store
            files, total = import_tree(volume, src, progress, check, owner)
            os.sync()  # the files' data before the root that names it
            volume.durable = True
            volume.commit()
        _place(tmp, dest, force)
    except BaseException:
        _discard(tmp)
        if store is not None:
            store.forget()
        raise
    return files, total, store.kind
