"""The node's image store: verified images, imported once, content-addressed, read-only.

An import copies an instance's signed build and ``cove.toml`` into a private
folder, checks them there (signature, listing, configuration: the same
``artifacts.load_verified`` as ``cove run``), then copies each image file once
to a temporary blob and hashes the copy. The image's tree is made of hard
links to those blobs, so a file shared by many images is stored once (as
containerd's content store does), and its root hash must equal the signed one
before the new blobs are fsynced and named by their SHA-256 and mode in
``blobs/``, and the tree is renamed into ``images/``: an import that fails or
is killed leaves only files and a folder under ``tmp/``, which the next
:meth:`ImageStore.collect` removes, never a partial image (docs/node.md: the
order of the writes).

Each image's ``image.json`` also names the uids that imported or ran it
(``users``; a record from before is root's), so the daemon shows and removes
a user's own images only; it is replaced whole (temporary file, fsync, rename).

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
import mmap
import os
import queue
import shutil
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import NoReturn

from cove import hostids
from cove.decode import Fields, decode_json
from cove.errors import CoveError, IntegrityError, NotFoundError, file_system_error
from cove.image import artifacts, encryption, tree, vmimage
from cove.image.artifacts import VerifiedBuild
from cove.image.tree import DIRECTORY, FILE, SYMLINK, Entry, difference, root_hash

BUILD_FILES = (artifacts.MANIFEST, artifacts.SIGNATURE, artifacts.TREE)
META_KEYS = ("name", "measurement", "signer", "files", "bytes", "imported", "users")  # image.json (docs/node.md)
ROOT_ONLY = (0,)  # the users of an image recorded before the store kept them: root's
MAX_USERS = 65536


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
    users: tuple[int, ...] = ROOT_ONLY  # the uids that imported (or ran) it, in the order they came

    def summary(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "measurement": self.measurement,
            "signer": self.signer,
            "files": self.files,
            "bytes": self.bytes,
            "imported": self.imported,
        }


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
        """An image's record (image.json), each field checked: a damaged one is one CoveError naming it."""
        what = f"images/{folder.name}/image.json"
        try:
            data = (folder / "image.json").read_bytes()
        except OSError as exc:
            raise file_system_error(exc) from None
        meta = Fields(decode_json(data, CoveError, what, limit=1 << 20), what, CoveError, allowed=META_KEYS)
        imported = meta.value("imported", (int, float))
        assert isinstance(imported, (int, float))  # checked just above
        listed = meta.list("users", min_items=1, max_items=MAX_USERS, default=ROOT_ONLY)
        users = tuple(uid for uid in listed if isinstance(uid, int) and not isinstance(uid, bool) and 0 <= uid < 2**32)
        if len(users) != len(listed):
            raise meta.fail("users", "must be a list of uids")
        return StoredImage(
            folder.name,
            meta.text("name"),
            meta.text("measurement"),
            meta.text("signer"),
            meta.integer("files"),
            meta.integer("bytes"),
            float(imported),
            folder / "root",
            folder / "cove.toml",
            folder / "build",
            users,
        )

    def list(self) -> list[StoredImage]:
        found = []
        for folder in sorted(self.images.iterdir()):
            try:
                found.append(self._load(folder))
            except CoveError:  # damaged or half-removed: not listed
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

    def import_instance(
        self, instance: Path, expected_signer: bytes | None = None, reader: int | None = None
    ) -> tuple[StoredImage, bool]:
        """Import a built instance (once); returns the image and whether it was new.

        With ``reader`` (a uid), every image file must be readable by that user by its owner or
        other bits, so a user cannot have root import files it could not read itself; for such a
        user no component of the instance's path may be a symbolic link, every file is opened
        relative to its folder's descriptor, and an image already stored is still read from the
        user's folder and checked (its files must be the user's to read, and the signed ones).
        """
        instance = Path(instance)
        with self._locked():
            work = Path(_mkdtemp(self.tmp))
            opened: list[int] = []
            try:
                base = _open_instance(instance, strict=reader is not None)
                opened.append(base)
                source = _open_dir(base, "build", instance / "build")
                opened.append(source)
                build = work / "build"
                build.mkdir(mode=0o700)
                for name in BUILD_FILES:
                    _copy_small(source, name, instance / "build" / name, build / name)
                _copy_small(base, "cove.toml", instance / "cove.toml", work / "cove.toml")
                verified = artifacts.load_verified(build, work / "cove.toml", expected_signer)
                if verified.config.enclave.backend not in ("auto", "sim", "vm"):
                    raise CoveError(
                        f"the node's image store runs sim and vm enclaves, not backend "
                        f"{verified.config.enclave.backend}",
                        "run it without the daemon",
                    )
                if verified.manifest.launch is not None:  # vm: checked here, and by the launcher at each run
                    (build / vmimage.FOLDER).mkdir(mode=0o700)
                    launch = _open_dir(source, vmimage.FOLDER, instance / "build" / vmimage.FOLDER)
                    opened.append(launch)
                    for name in (vmimage.KERNEL, vmimage.INITRD, vmimage.LAUNCH):
                        _copy_file(
                            launch, name, instance / "build" / vmimage.FOLDER / name, build / vmimage.FOLDER / name
                        )
                    # the copies, not the user's folder: a tampered kernel is never stored under the signed id
                    vmimage.check(build, verified.manifest.launch["measurement"])
                if _has_encrypted_image(source):  # even if its plain twin is stored
                    raise CoveError(
                        "an image built with --encrypt-image is not stored by the node", "run it without the daemon"
                    )
                ident = image_id(verified)
                stored = (self.images / ident).is_dir()
                claimant = 0 if reader is None else reader
                if stored and reader is None:
                    return self._claimed(self._load(self.images / ident), claimant), False
                # (for another user: even so; its new blobs are then dropped, not published)
                files, size = self._fill(base, work / "root", verified, reader, keep=not stored)
                if stored:
                    return self._claimed(self._load(self.images / ident), claimant), False
                meta = {
                    "name": verified.config.enclave.name,
                    "measurement": verified.measurement.hex(),
                    "signer": verified.signer.hex(),
                    "files": files,
                    "bytes": size,
                    "imported": time.time(),
                    "users": [claimant],
                }
                _write_durably(work / "image.json", json.dumps(meta).encode())
                os.rename(work, self.images / ident)
                _fsync_path(self.images, os.O_DIRECTORY)  # the import, once answered, survives a machine crash
                return self._load(self.images / ident), True
            finally:
                for fd in opened:
                    os.close(fd)
                if work.exists():
                    _remove_tree(work)

    def _fill(
        self, instance: int, root: Path, verified: VerifiedBuild, reader: int | None, keep: bool = True
    ) -> tuple[int, int]:
        """Hash image into blobs and a tree of links to them; the root hash must match the signed one.

        A new blob stays a temporary file under tmp/ (the tree links its inode) until the whole image
        matched: then all of them are fsynced at once and only then renamed into blobs/ (see _publish).
        """
        pending: dict[str, Path] = {}  # blob name -> its temporary file, for blobs new to the store
        try:
            counted = self._fill_tree(instance, root, verified, reader, pending)
            if keep:
                self._publish(pending)
        finally:
            for tmp in pending.values():  # whatever was not published (a failure, or keep=False)
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
        return counted

    def _publish(self, pending: dict[str, Path]) -> None:
        """Make the new blobs durable, then name them in blobs/: a name there always has its content on disk.

        One fsync per blob, as before, but concurrently: the file system commits its journal once for
        many of them instead of once each (2,000 small files: about 0.4 s of fsyncs one after another,
        0.1-0.2 s at once). A single syncfs would be faster still, but it would write back every other
        writer's data on the disk too, for as long as that takes.
        """
        paths = list(pending.values())
        if len(paths) == 1:
            _fsync_path(paths[0])
        elif paths:
            with ThreadPoolExecutor(max_workers=min(SYNC_THREADS, len(paths)), thread_name_prefix="store-sync") as pool:
                list(pool.map(_fsync_path, paths))
        for name in list(pending):
            os.rename(pending[name], self.blobs / name)  # under the store's lock: no other writer of blobs/
            del pending[name]

    def _fill_tree(
        self, instance: int, root: Path, verified: VerifiedBuild, reader: int | None, pending: dict[str, Path]
    ) -> tuple[int, int]:
        owner = hostids.enclave_range().host(0, 0) if os.geteuid() == 0 else None
        root.mkdir(mode=0o700)
        actual: list[Entry] = []
        folders: list[tuple[str, int]] = []
        size = 0
        # every folder is opened relative to its parent, never following a link, and every check is made on
        # what was opened: a folder swapped for a symbolic link mid-import leads nowhere else
        listed = {entry.path: entry for entry in verified.entries}  # a file the listing does not match stops the copy
        top = _open_folder(instance, "image", "/")
        _check_readable(os.fstat(top), "image", reader)
        stack: list[tuple[int, Iterator[str], str, str]] = []
        try:
            stack.append((top, iter(_names(top, "/")), "", str(root)))
            while stack:
                folder, names, prefix, dest = stack[-1]
                name = next(names, None)
                if name is None:
                    os.close(folder)
                    stack.pop()
                    continue
                rel, dst = prefix + name, f"{dest}/{name}"
                st = os.stat(name, dir_fd=folder, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    sub = _open_folder(folder, name, rel)
                    try:
                        st = os.fstat(sub)
                        _check_readable(st, f"image/{rel}", reader)
                        mode = stat.S_IMODE(st.st_mode)
                        actual.append(Entry(rel, DIRECTORY, mode))
                        os.mkdir(dst, 0o700)
                        folders.append((dst, mode))
                        stack.append((sub, iter(_names(sub, rel)), rel + "/", dst))
                    except BaseException:
                        os.close(sub)
                        raise
                elif stat.S_ISLNK(st.st_mode):
                    target = os.readlink(name, dir_fd=folder)
                    actual.append(Entry(rel, SYMLINK, 0o777, target=target))
                    os.symlink(target, dst)
                    if owner is not None:
                        os.lchown(dst, *owner)
                elif stat.S_ISREG(st.st_mode):
                    want = listed.get(rel)
                    if want is None or want.type != FILE or want.size != st.st_size:
                        _changed(want, Entry(rel, FILE, stat.S_IMODE(st.st_mode), st.st_size))
                    digest, length, mode, stored = self._blob(folder, name, rel, owner, reader, pending)
                    os.link(stored, dst)
                    if length != want.size or not hmac.compare_digest(digest, want.digest):
                        _changed(want, Entry(rel, FILE, mode, length, digest))
                    actual.append(Entry(rel, FILE, mode, length, digest))
                    size += length
                else:
                    raise IntegrityError(f"image changed since the build: {rel} is a special file")
        finally:
            for folder, *_ in stack:
                os.close(folder)
        if not hmac.compare_digest(root_hash(actual), verified.manifest.image_root):
            what = difference(verified.entries, actual) or "its listing differs"
            raise IntegrityError(
                f"image changed since the build: {what}", "rebuild with `cove build` if the change is intended"
            )
        for path, mode in [*reversed(folders), (str(root), 0o755)]:
            if owner is not None:
                os.chown(path, *owner)
            os.chmod(path, mode)
        return sum(1 for e in actual if e.type == FILE), size

    def _blob(
        self,
        folder: int,
        name: str,
        rel: str,
        owner: tuple[int, int] | None,
        reader: int | None,
        pending: dict[str, Path],
    ) -> tuple[bytes, int, int, Path]:
        """Copy name (in the open folder) to a temporary blob and hash the copy; (digest, size, mode, the file
        to link): the stored blob if there is one, else the temporary file, kept in ``pending`` until the
        import publishes it (one file per content, however many times the image holds it)."""
        try:  # (O_NONBLOCK: a file swapped for a fifo must not hang the import)
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
        except OSError as exc:
            raise IntegrityError(f"image changed since the build: {rel} cannot be opened ({exc.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IntegrityError(f"image changed since the build: {rel} is no longer a regular file")
            _check_readable(st, f"image/{rel}", reader)
        except BaseException:
            os.close(fd)
            raise
        tmp = self.tmp / f".blob-{os.getpid()}-{os.urandom(6).hex()}"
        out = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)  # (read: it is hashed)
        try:
            digest, size = _copy_hashed(fd, out)
            mode = stat.S_IMODE(st.st_mode)
            if owner is not None:
                os.fchown(out, *owner)  # before the mode: a chown clears set-id bits
            os.fchmod(out, mode)  # as listed; read-only comes from the root-only store and the read-only bind
            blob = self.blobs / f"{digest.hex()}-{mode:04o}"
            if blob.exists():
                os.unlink(tmp)
                return digest, size, mode, blob
            if blob.name in pending:  # the same content earlier in this image
                os.unlink(tmp)
                return digest, size, mode, pending[blob.name]
            pending[blob.name] = tmp
            return digest, size, mode, tmp
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
            self._remove_unlocked(image)
        return image

    def _remove_unlocked(self, image: StoredImage) -> None:
        doomed = self.tmp / f"rm-{image.id}-{os.urandom(4).hex()}"
        os.rename(self.images / image.id, doomed)  # gone from images/ at once
        _remove_tree(doomed)

    def claim(self, ident: str, uid: int) -> StoredImage:
        """Record that ``uid`` uses the image (a run that skipped the import); NotFoundError if it is gone."""
        with self._locked():
            return self._claimed(self.get(ident), uid)

    def release(self, ident: str, uid: int, keep: bool = False) -> tuple[StoredImage, bool]:
        """Drop ``uid``'s claim on the image; the image itself goes with its last claim, unless ``keep`` (another
        user's enclave still names it): then it is root's, as a record from before the store kept users.
        (image, removed)."""
        with self._locked():
            image = self.get(ident)
            users = tuple(u for u in image.users if u != uid) or (ROOT_ONLY if keep else ())
            if users:
                if users != image.users:
                    self._write_users(image, users)
                return image, False
            self._remove_unlocked(image)
            return image, True

    def _claimed(self, image: StoredImage, uid: int) -> StoredImage:
        """The image with ``uid`` among its users (image.json rewritten if it was not); under the lock."""
        if uid in image.users or len(image.users) >= MAX_USERS:
            return image
        self._write_users(image, (*image.users, uid))
        return self._load(self.images / image.id)

    def _write_users(self, image: StoredImage, users: tuple[int, ...]) -> None:
        """Replace image.json whole (a temporary file in tmp/, fsynced, renamed over it): a crash leaves the
        old record or the new one, and at worst a stray file in tmp/ that the next collection removes."""
        meta = dict(image.summary(), users=list(users))
        del meta["id"]
        tmp = self.tmp / f".image-{os.getpid()}-{os.urandom(6).hex()}.json"
        _write_durably(tmp, json.dumps(meta).encode())
        os.rename(tmp, self.images / image.id / "image.json")
        _fsync_path(self.images / image.id, os.O_DIRECTORY)

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


COPY_STEP = 8 << 20  # bytes per copy_file_range call; each step is hashed while the next is copied
SYNC_THREADS = 32  # concurrent fsyncs when an import publishes its new blobs
NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF})


def _copy_hashed(source: int, out: int) -> tuple[bytes, int]:
    """Copy ``source`` to the empty file ``out``; (SHA-256, size) of what ``out`` now holds.

    The hash is always of the store's own copy, never of the user's file, which may change meanwhile. The
    copy is made in the kernel (copy_file_range: no pass of the bytes through Python), and once a file
    takes more than one step, a second thread hashes each step from the page cache while the next is
    copied (hashlib releases the GIL on large buffers, so on two cores the hash costs little on top of the
    copy). Where the kernel cannot copy between these two files (another file system on an older kernel,
    say), it is one read, hash and write of each chunk.
    """
    try:
        first = os.copy_file_range(source, out, COPY_STEP, 0, 0)
    except OSError as exc:
        if exc.errno not in NO_KERNEL_COPY:
            raise
        return tree.copy_hashing(source, out)
    if first == 0 and os.fstat(source).st_size > 0:  # a file system that copies nothing without saying so
        return tree.copy_hashing(source, out)
    digest = hashlib.sha256()
    size = first
    copied = os.copy_file_range(source, out, COPY_STEP, size, size) if first else 0
    if not copied:  # one step held it all (most files of an image): hashed here, no thread
        if first:
            _hash_range(digest.update, out, 0, first)
        return digest.digest(), first
    steps: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
    failed: list[BaseException] = []

    def hasher() -> None:
        while (step := steps.get()) is not None:
            if not failed:
                try:
                    _hash_range(digest.update, out, *step)
                except BaseException as exc:  # handed to the copying thread
                    failed.append(exc)

    thread = threading.Thread(target=hasher, name="store-hash", daemon=True)
    thread.start()
    try:
        steps.put((0, first))
        while copied and not failed:
            steps.put((size, copied))
            size += copied
            copied = os.copy_file_range(source, out, COPY_STEP, size, size)
    finally:
        steps.put(None)
        thread.join()
    if failed:
        raise failed[0]
    return digest.digest(), size


def _hash_range(update: Callable[[memoryview], None], fd: int, offset: int, length: int) -> None:
    """Feed ``length`` bytes of ``fd`` from ``offset`` to a digest's ``update`` through a read-only mapping."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(fd, offset + length - start, prot=mmap.PROT_READ, offset=start) as mapped:
        with memoryview(mapped) as view, view[offset - start :] as part:
            update(part)


def _changed(listed: Entry | None, found: Entry) -> NoReturn:
    """A file of the image that is not as the signed listing says: the import stops there, before copying more."""
    what = difference([listed] if listed is not None else [], [found]) or f"{found.path} differs"
    raise IntegrityError(
        f"image changed since the build: {what}", "rebuild with `cove build` if the change is intended"
    )


def _write_durably(path: Path, data: bytes) -> None:
    """Write and fsync a new file: its content is on the disk before the rename that publishes its folder
    (ext4 journals the rename and the tree's links in order, but not a fresh file's delayed data)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_path(path: Path, kind: int = os.O_NOFOLLOW) -> None:
    """fsync a file (never through a link) or, with kind=os.O_DIRECTORY, a folder."""
    fd = os.open(path, os.O_RDONLY | kind | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_folder(parent: int | None, name: str, rel: str) -> int:
    """A folder of the image, opened without following a symbolic link (relative to parent's descriptor)."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    except OSError as exc:
        raise IntegrityError(f"cannot read the image folder {rel}: {exc.strerror}") from None


def _names(folder: int, rel: str) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError as exc:
        raise IntegrityError(f"cannot read the image folder {rel}: {exc.strerror}") from None


def _check_readable(st: os.stat_result, what: str, reader: int | None) -> None:
    """With a reader (the requesting uid), what was opened must be readable by it (owner or other bits)."""
    mode = stat.S_IMODE(st.st_mode)
    if reader is not None and not (mode & 0o004 or (st.st_uid == reader and mode & 0o400)):
        raise CoveError(
            f"{what} is not readable by uid {reader}: the daemon imports only what the requesting user may read"
        )


def _mkdtemp(parent: Path) -> str:

    path = parent / f"import-{os.getpid()}-{os.urandom(6).hex()}"
    path.mkdir(mode=0o700)
    return str(path)


def _has_encrypted_image(build: int) -> bool:
    """Whether the build folder (its descriptor) holds an --encrypt-image volume: looked at, never followed
    or read (the key file of a user's build, read as root, could be a FIFO or a link to any file)."""
    try:
        return stat.S_ISDIR(os.stat(encryption.ENCRYPTED_IMAGE, dir_fd=build, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _open_instance(instance: Path, strict: bool) -> int:
    """The instance folder's descriptor; strict: no component of its (absolute) path a symbolic link."""
    if not strict:
        return _open_dir(None, str(instance), instance)
    if not instance.is_absolute():
        raise NotFoundError(f"{instance} is not an absolute path")
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in instance.parts[1:]:
            following = _open_dir(fd, part, instance)
            os.close(fd)
            fd = following
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_dir(parent: int | None, name: str, shown: Path) -> int:
    """A folder of the instance, relative to parent's descriptor, never through a symbolic link."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            raise NotFoundError(
                f"{shown} is missing or not a folder (a symbolic link is not followed)", "run `cove build` first"
            ) from None
        raise


def _open_file(folder: int, name: str, shown: Path) -> int:
    """A build file, relative to its folder's descriptor: a regular file, never through a symbolic link."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP):
            raise NotFoundError(f"{shown} is missing or not a regular file", "run `cove build` first") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotFoundError(f"{shown} is missing or not a regular file", "run `cove build` first")
    return fd


def _copy_small(folder: int, name: str, shown: Path, dest: Path, limit: int = 64 << 20) -> None:
    """Copy a build file (never following a symlink), refusing absurd sizes."""
    fd = _open_file(folder, name, shown)
    source = shown
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise CoveError(f"{source} is larger than {limit >> 20} MB")
    dest.write_bytes(data)


def _copy_file(folder: int, name: str, shown: Path, dest: Path) -> None:
    """Copy a build file of any size (a vm's kernel and initramfs), never following a symlink."""
    fd = _open_file(folder, name, shown)
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
