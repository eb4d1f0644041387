"""The node's image store: verified images, imported once, content-addressed, read-only.

An import copies an instance's signed build and ``cove.toml`` into a private
folder, checks them there (signature, listing, configuration: the same
``artifacts.load_verified`` as ``cove run``), then reads each image file once,
hashing it while writing it to a blob named by its SHA-256 and mode. The
image's tree is made of hard links to those blobs, so a file shared by many
images is stored once (as containerd's content store does), and its root hash
must equal the signed one before the tree is renamed into ``images/``: an
import that fails or is killed leaves only a folder under ``tmp/``, which the
next :meth:`ImageStore.collect` removes, never a partial image.

Only root can enter the store (mode 0700). Tree files belong to the
enclave's host ids (cove.hostids) as a private copy does, so an enclave sees
its files as its own, but enclaves get the tree through a read-only bind and
no host user but root can reach it. Layout: docs/node.md.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import json
import os
import shutil
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator

from cove import hostids
from cove.errors import CoveError, IntegrityError, NotFoundError
from cove.image import artifacts, encryption, vmimage
from cove.image.artifacts import VerifiedBuild
from cove.image.tree import CHUNK, DIRECTORY, FILE, SYMLINK, Entry, difference, root_hash

BUILD_FILES = (artifacts.MANIFEST, artifacts.SIGNATURE, artifacts.TREE)


@dataclass(frozen=True)
class StoredImage:
    id: str  # measurement hex, then the first 16 hex digits of the signer
    name: str
    measurement: str
    signer: str
    files: int
    bytes: int
    imported: float
    root: Path
    config: Path
    build: Path

    def summary(self) -> dict:
        return {"id": self.id, "name": self.name, "measurement": self.measurement, "signer": self.signer,
                "files": self.files, "bytes": self.bytes, "imported": self.imported}


def image_id(verified: VerifiedBuild) -> str:
    return f"{verified.measurement.hex()}-{verified.signer.hex()[:16]}"


class ImageStore:
    """The store at ``path`` (root-only); see the module docstring."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.blobs = self.path / "blobs" / "sha256"
        self.images = self.path / "images"
        self.tmp = self.path / "tmp"
        for folder in (self.path, self.blobs, self.images, self.tmp):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time (imports, removals, collection), across processes."""
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- reading

    def get(self, ident: str) -> StoredImage:
        """An image by id or by a unique prefix of at least 12 hex digits."""
        if not ident or "/" in ident or ident.startswith("."):
            raise NotFoundError(f"no image {ident!r} in the store")
        folder = self.images / ident
        if not folder.is_dir():
            matches = [p for p in self.images.iterdir() if p.name.startswith(ident)] if len(ident) >= 12 else []
            if len(matches) != 1:
                raise NotFoundError(f"no image {ident!r} in the store", "`cove images` lists them")
            folder = matches[0]
        return self._load(folder)

    def _load(self, folder: Path) -> StoredImage:
        meta = json.loads((folder / "image.json").read_text())
        return StoredImage(folder.name, meta["name"], meta["measurement"], meta["signer"], meta["files"],
                           meta["bytes"], meta["imported"], folder / "root", folder / "cove.toml", folder / "build")

    def list(self) -> list[StoredImage]:
        found = []
        for folder in sorted(self.images.iterdir()):
            try:
                found.append(self._load(folder))
            except (OSError, ValueError, KeyError):
                continue
        return found

    def verified(self, image: StoredImage) -> VerifiedBuild:
        """The stored build checked again (signature and configuration; small files only)."""
        return artifacts.load_verified(image.build, image.config)

    def size(self) -> int:
        """Bytes held by blobs (each stored once, however many images link it)."""
        total = 0
        for entry in os.scandir(self.blobs):
            try:
                total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                pass
        return total

    # -- writing

    def import_instance(self, instance: Path, expected_signer: bytes | None = None,
                        reader: int | None = None) -> tuple[StoredImage, bool]:
        """Import a built instance (once); returns the image and whether it was new.

        With ``reader`` (a uid), every image file must be readable by that user by its owner or
        other bits, so a user cannot have root import files it could not read itself.
        """
        instance = Path(instance)
        with self._locked():
            work = Path(_mkdtemp(self.tmp))
            try:
                build = work / "build"
                build.mkdir(mode=0o700)
                for name in BUILD_FILES:
                    _copy_small(instance / "build" / name, build / name)
                _copy_small(instance / "cove.toml", work / "cove.toml")
                verified = artifacts.load_verified(build, work / "cove.toml", expected_signer)
                if verified.config.enclave.backend not in ("auto", "sim", "vm"):
                    raise CoveError(f"the node's image store runs sim and vm enclaves, not backend "
                                    f"{verified.config.enclave.backend}", "run it without the daemon")
                if verified.manifest.launch is not None:  # vm: the launcher checks them against it at each run
                    (build / vmimage.FOLDER).mkdir(mode=0o700)
                    for name in (vmimage.KERNEL, vmimage.INITRD, vmimage.LAUNCH):
                        _copy_file(instance / "build" / vmimage.FOLDER / name, build / vmimage.FOLDER / name)
                if encryption.find(instance / "build") is not None:  # even if its plain twin is stored
                    raise CoveError("an image built with --encrypt-image is not stored by the node",
                                    "run it without the daemon")
                ident = image_id(verified)
                if (self.images / ident).is_dir():
                    return self._load(self.images / ident), False
                files, size = self._fill(instance / "image", work / "root", verified, reader)
                meta = {"name": verified.config.enclave.name, "measurement": verified.measurement.hex(),
                        "signer": verified.signer.hex(), "files": files, "bytes": size, "imported": time.time()}
                (work / "image.json").write_text(json.dumps(meta))
                os.rename(work, self.images / ident)
                return self._load(self.images / ident), True
            finally:
                if work.exists():
                    _remove_tree(work)

    def _fill(self, image: Path, root: Path, verified: VerifiedBuild, reader: int | None) -> tuple[int, int]:
        """Hash image into blobs and a tree of links to them; the root hash must match the signed one."""
        owner = hostids.enclave_range().host(0, 0) if os.geteuid() == 0 else None
        root.mkdir(mode=0o700)
        actual: list[Entry] = []
        folders: list[tuple[str, int]] = []
        size = 0
        stack = [("", str(image), str(root))]
        while stack:
            prefix, source, dest = stack.pop()
            try:
                names = sorted(os.listdir(source))
            except OSError as exc:
                raise IntegrityError(f"cannot read the image folder {prefix or '/'}: {exc.strerror}") from None
            for name in names:
                rel, src, dst = prefix + name, f"{source}/{name}", f"{dest}/{name}"
                st = os.lstat(src)
                mode = stat.S_IMODE(st.st_mode)
                if reader is not None and not stat.S_ISLNK(st.st_mode) and not (
                        mode & 0o004 or (st.st_uid == reader and mode & 0o400)):
                    raise CoveError(f"image/{rel} is not readable by uid {reader}: the daemon imports only "
                                    "what the requesting user may read")
                if stat.S_ISDIR(st.st_mode):
                    actual.append(Entry(rel, DIRECTORY, mode))
                    os.mkdir(dst, 0o700)
                    folders.append((dst, mode))
                    stack.append((rel + "/", src, dst))
                elif stat.S_ISLNK(st.st_mode):
                    target = os.readlink(src)
                    actual.append(Entry(rel, SYMLINK, 0o777, target=target))
                    os.symlink(target, dst)
                    if owner is not None:
                        os.lchown(dst, *owner)
                elif stat.S_ISREG(st.st_mode):
                    digest, length, mode = self._blob(src, rel, owner)
                    os.link(self.blobs / f"{digest.hex()}-{mode:04o}", dst)
                    actual.append(Entry(rel, FILE, mode, length, digest))
                    size += length
                else:
                    raise IntegrityError(f"image changed since the build: {rel} is a special file")
        if not hmac.compare_digest(root_hash(actual), verified.manifest.image_root):
            what = difference(verified.entries, actual) or "its listing differs"
            raise IntegrityError(f"image changed since the build: {what}",
                                 "rebuild with `cove build` if the change is intended")
        for path, mode in [*reversed(folders), (str(root), 0o755)]:
            if owner is not None:
                os.chown(path, *owner)
            os.chmod(path, mode)
        return sum(1 for e in actual if e.type == FILE), size

    def _blob(self, src: str, rel: str, owner: tuple[int, int] | None) -> tuple[bytes, int, int]:
        """Hash src while writing it to a temporary blob; keep the blob unless it is already stored."""
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise IntegrityError(f"image changed since the build: {rel} cannot be opened ({exc.strerror})") from None
        tmp = self.tmp / f".blob-{os.getpid()}-{os.urandom(6).hex()}"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IntegrityError(f"image changed since the build: {rel} is no longer a regular file")
            digest = hashlib.sha256()
            size = 0
            while chunk := os.read(fd, CHUNK):
                digest.update(chunk)
                size += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
            mode = stat.S_IMODE(st.st_mode)
            if owner is not None:
                os.fchown(out, *owner)  # before the mode: a chown clears set-id bits
            os.fchmod(out, mode)  # as listed; read-only comes from the root-only store and the read-only bind
            name = self.blobs / f"{digest.hexdigest()}-{mode:04o}"
            if name.exists():
                os.unlink(tmp)
            else:
                os.fsync(out)
                os.rename(tmp, name)
            return digest.digest(), size, mode
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        finally:
            os.close(fd)
            os.close(out)

    def remove(self, ident: str) -> StoredImage:
        """Remove an image's tree; its blobs go at the next collection if no other image links them."""
        with self._locked():
            image = self.get(ident)
            doomed = self.tmp / f"rm-{image.id}-{os.urandom(4).hex()}"
            os.rename(self.images / image.id, doomed)  # gone from images/ at once
            _remove_tree(doomed)
        return image

    def collect(self) -> tuple[int, int]:
        """Remove leftovers of interrupted imports and blobs no image links; (blobs, bytes) freed."""
        freed = count = 0
        with self._locked():
            for entry in os.scandir(self.tmp):
                if entry.is_dir(follow_symlinks=False):
                    _remove_tree(Path(entry.path))
                else:
                    os.unlink(entry.path)
            for entry in os.scandir(self.blobs):
                st = entry.stat(follow_symlinks=False)
                if st.st_nlink == 1:
                    os.unlink(entry.path)
                    freed += st.st_size
                    count += 1
        return count, freed


def _mkdtemp(parent: Path) -> str:
    path = parent / f"import-{os.getpid()}-{os.urandom(6).hex()}"
    path.mkdir(mode=0o700)
    return str(path)


def _copy_small(source: Path, dest: Path, limit: int = 64 << 20) -> None:
    """Copy a build file (never following a symlink), refusing absurd sizes."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP):
            raise NotFoundError(f"{source} is missing or not a regular file", "run `cove build` first") from None
        raise
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise CoveError(f"{source} is larger than {limit >> 20} MB")
    dest.write_bytes(data)


def _copy_file(source: Path, dest: Path) -> None:
    """Copy a build file of any size (a vm's kernel and initramfs), never following a symlink."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP):
            raise NotFoundError(f"{source} is missing or not a regular file", "run `cove build` first") from None
        raise
    with os.fdopen(fd, "rb") as handle, open(dest, "xb") as out:
        shutil.copyfileobj(handle, out, 1 << 20)


def _remove_tree(path: Path) -> None:
    """Remove a folder whose parts may be read-only (root may anyway; chmod for other users)."""
    def retry(function, name, _exc):
        try:
            os.chmod(os.path.dirname(name), 0o700)
            function(name)
        except OSError:
            pass
    shutil.rmtree(path, onerror=retry)
