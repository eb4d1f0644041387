"""A bundle's root file system, checked against the signed build it carries under /.cove/.

Nothing in the bundle is trusted: the engine unpacked it, and anyone with
access to its storage may have changed it. The signed build is copied out of
`/.cove/` into the container's private state folder and verified there
(signature, listing, configuration: ``artifacts.load_verified``, as `cove
run` does). Then exactly the signed listing is copied out of the root file
system into a private root, each file opened without following symlinks
(every parent folder too) and hashed while copied; what the engine added
(mount points, /etc/hosts, /run/.containerenv) is simply not part of it.
The enclave runs from that copy, never from the bundle.
"""

from __future__ import annotations

import hmac
import os
import stat
from pathlib import Path

from cove import hostids
from cove.errors import IntegrityError
from cove.image import artifacts, encryption, tree
from cove.image.artifacts import VerifiedBuild
from cove.image.encryption import EncryptedImage
from cove.image.tree import DIRECTORY, FILE, SYMLINK, Entry
from cove.oci import COVE_DIR

SMALL = 1 << 24  # the signed build's files are small; a bigger one is refused, not read


def _open_below(root_fd: int, rel: str, flags: int) -> int:
    """Open rel below root_fd, refusing a symlink anywhere on the way."""
    parts = rel.split("/")
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            if part in ("", ".", ".."):
                raise IntegrityError(f"{rel}: not a plain path")
            next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def _open_file_below(root_fd: int, rel: str, refusal: str) -> int:
    """Open the regular file rel below root_fd for reading; anything else is refused before it is opened.

    The runtime is root: a FIFO in a layer would block `create` for ever, and
    opening a device node can have effects (and make it a controlling terminal).
    So the name is first opened as a path only (O_PATH opens nothing), checked,
    and the very same inode is then opened through /proc/self/fd, non-blocking
    and without becoming a terminal.
    """
    path_fd = _open_below(root_fd, rel, os.O_PATH)
    try:
        if not stat.S_ISREG(os.fstat(path_fd).st_mode):
            raise IntegrityError(refusal)
        fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # cannot differ; checked again all the same
        os.close(fd)
        raise IntegrityError(refusal)
    return fd


def copy_regular(source: str, target: str) -> None:
    """shutil.copytree's copy_function for a tree root copies: regular files only, special files left out.

    Nothing else is opened (a FIFO would block, /dev/zero would fill the disk):
    the name is opened as a path without following a link, checked, then the
    same inode is opened non-blocking and without becoming a terminal.
    """
    import shutil  # the unmeasured-debug path only

    path_fd = os.open(source, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(path_fd)
        if not stat.S_ISREG(st.st_mode):
            return  # devices and FIFOs an engine made: the sandbox brings its own /dev
        fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)
    try:
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with open(fd, "rb", closefd=False) as src, open(out, "wb", closefd=False) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.fchmod(out, stat.S_IMODE(st.st_mode))
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(out)
    finally:
        os.close(fd)


def _read_small(root_fd: int, rel: str) -> bytes:
    fd = _open_file_below(root_fd, rel, f"/{rel} in the image is not a regular file")
    try:
        data = os.read(fd, SMALL + 1)
        if len(data) > SMALL:
            raise IntegrityError(f"/{rel} in the image is too large to be Cove's")
        return data
    finally:
        os.close(fd)


def _check_folder_below(root_fd: int, rel: str) -> None:
    """rel is a real folder below root_fd, reached without a symlink: the FUSE server opens it by path, as root."""
    try:
        fd = _open_below(root_fd, rel, os.O_PATH)
    except FileNotFoundError:
        raise IntegrityError(f"/{rel} is missing from the image") from None
    except OSError as exc:
        raise IntegrityError(f"/{rel} in the image cannot be opened: {exc.strerror}") from None
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise IntegrityError(f"/{rel} in the image is not a folder (a link or another file there is refused)")
    finally:
        os.close(fd)


def load_build(rootfs: Path, dest: Path) -> tuple[VerifiedBuild, EncryptedImage | None]:
    """Copy /.cove/'s signed build out of the root file system into dest and verify it there."""
    root_fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        names = ("cove.toml", *(f"build/{n}" for n in (artifacts.MANIFEST, artifacts.SIGNATURE, artifacts.TREE)))
        (dest / "build").mkdir(mode=0o700, parents=True)
        for name in names:
            source = f"{COVE_DIR}/{name.rpartition('/')[2]}"
            try:
                data = _read_small(root_fd, source)
            except FileNotFoundError:
                raise IntegrityError(
                    f"the image has no signed Cove build (/{source} is missing)", "package it with `cove package --oci`"
                ) from None
            except OSError as exc:
                raise IntegrityError(f"/{source} in the image cannot be read: {exc.strerror}") from None
            (dest / name).write_bytes(data)
        encrypted = None
        try:
            key = _read_small(root_fd, f"{COVE_DIR}/{encryption.IMAGE_KEY}").decode().strip()
        except FileNotFoundError:
            pass
        else:
            _check_folder_below(root_fd, f"{COVE_DIR}/{encryption.ENCRYPTED_IMAGE}")
            encrypted = EncryptedImage(rootfs / COVE_DIR / encryption.ENCRYPTED_IMAGE, key)
    finally:
        os.close(root_fd)
    return artifacts.load_verified(dest / "build", dest / "cove.toml"), encrypted


def copy_signed(rootfs: Path, entries: list[Entry], dest: Path) -> Path:
    """Copy exactly the signed listing from rootfs to dest, checking every byte; the private root."""
    owner = hostids.enclave_range().host(0, 0) if os.geteuid() == 0 else None
    dest.mkdir(mode=0o700)
    root_fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for entry in sorted(entries, key=lambda e: e.path.split("/")):
            target = dest / entry.path
            try:
                if entry.type == DIRECTORY:
                    fd = _open_below(root_fd, entry.path, os.O_RDONLY | os.O_DIRECTORY)
                    os.close(fd)
                    os.mkdir(target, 0o700)
                elif entry.type == SYMLINK:
                    parent = (
                        _open_below(root_fd, entry.path.rpartition("/")[0] or ".", os.O_RDONLY | os.O_DIRECTORY)
                        if "/" in entry.path
                        else os.dup(root_fd)
                    )
                    try:
                        found = os.readlink(entry.path.rpartition("/")[2], dir_fd=parent)
                    finally:
                        os.close(parent)
                    if found != entry.target:
                        raise IntegrityError(f"image changed since the build: {entry.path} now points to {found}")
                    os.symlink(found, target)
                    if owner is not None:
                        os.lchown(target, *owner)
                elif entry.type == FILE:
                    _copy_file(root_fd, entry, target, owner)
            except (FileNotFoundError, NotADirectoryError):
                raise IntegrityError(f"image changed since the build: {entry.path} was removed") from None
            except OSError as exc:
                if exc.errno == 40:  # ELOOP: a symlink where the listing has a file or folder
                    raise IntegrityError(f"image changed since the build: {entry.path} changed type") from None
                raise
        for entry in sorted((e for e in entries if e.type == DIRECTORY), key=lambda e: e.path, reverse=True):
            if owner is not None:
                os.chown(dest / entry.path, *owner)
            os.chmod(dest / entry.path, entry.mode)
        if owner is not None:
            os.chown(dest, *owner)
        os.chmod(dest, 0o755)
    except BaseException:
        import shutil  # only on a refusal: create's path does without it

        shutil.rmtree(dest, ignore_errors=True)
        raise
    finally:
        os.close(root_fd)
    return dest


def _copy_file(root_fd: int, entry: Entry, target: Path, owner: tuple[int, int] | None) -> None:
    fd = _open_file_below(root_fd, entry.path, f"image changed since the build: {entry.path} changed type")
    try:
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except BaseException:
        os.close(fd)
        raise
    try:
        digest, size = tree.copy_hashing(fd, out)
        if size != entry.size or not hmac.compare_digest(digest, entry.digest):
            raise IntegrityError(
                f"image changed since the build: {entry.path} was modified (content differs)",
                "pull or load the image again; never edit a container's root file system",
            )
        if owner is not None:
            os.fchown(out, *owner)
        os.fchmod(out, entry.mode)
    finally:
        os.close(fd)
        os.close(out)
