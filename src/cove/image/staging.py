"""The enclave's root: a private copy of the image made from verified bytes.

Each file is read once, hashed and written in the same pass into a folder
only the launching user can enter, and the finished listing must equal the
signed one. The enclave is then served from that copy, so nothing can swap a
file between the check and its use. A package extracted into a private folder
is verified in place instead (it is already such a copy).

When root starts the enclave, the copy belongs to the host ids of the
enclave's root (cove.hostids): the enclave never runs as host root, and it
owns its files as it does when another user starts it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import threading
from pathlib import Path

from cove import hostids
from cove.errors import CoveError, IntegrityError
from cove.image.paths import make_folder_in_image
from cove.image.tree import CHUNK, DIRECTORY, FILE, SYMLINK, Entry, difference, root_hash

WORKERS = 2
# Mount points the sandbox always needs, whatever the image holds.
ALWAYS = ("proc", "dev", "tmp")


def stage(image: Path, expected: list[Entry], expected_root: bytes, dest: Path | None) -> Path:
    """Verify image against the signed listing; copy it to dest on the way (None: verify in place)."""
    actual: list[Entry] = []
    files: list[tuple[str, str | None, str]] = []
    owner = None
    if dest is not None:
        if os.geteuid() == 0:
            owner = hostids.enclave_range().host(0, 0)
        dest.mkdir(mode=0o700)
    _visit(str(image), None if dest is None else str(dest), "", actual, files, owner)
    actual.extend(_copy_all(files, owner))
    if dest is not None:
        for entry in sorted((e for e in actual if e.type == DIRECTORY), key=lambda e: e.path, reverse=True):
            path = os.path.join(dest, entry.path)
            if owner is not None:
                os.chown(path, *owner)
            os.chmod(path, entry.mode)
    if not hmac.compare_digest(root_hash(actual), expected_root):
        what = difference(expected, actual) or "its listing differs"
        raise IntegrityError(
            f"image changed since the build: {what}", "rebuild with `cove build` if the change is intended"
        )
    root = dest if dest is not None else image
    if dest is not None:
        if owner is not None:
            os.chown(dest, *owner)
        os.chmod(dest, 0o755)
    return root


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """Give a private root (a package extracted by root) to the enclave's host ids."""
    os.lchown(root, uid, gid)
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            os.lchown(path, uid, gid)
            if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) & 0o6000:
                os.chmod(path, stat.S_IMODE(mode))  # chown clears set-id bits; the listing has them


def _copy_all(files: list[tuple[str, str | None, str]], owner: tuple[int, int] | None) -> list[Entry]:
    """Copy and hash files on a few threads (hashing and I/O release the GIL)."""
    results: list[list[Entry]] = [[] for _ in range(WORKERS)]
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            results[index] = [_file_entry(job, owner) for job in files[index::WORKERS]]
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(1, WORKERS)]
    for thread in threads:
        thread.start()
    work(0)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [entry for part in results for entry in part]


def _visit(
    source: str,
    dest: str | None,
    prefix: str,
    out: list[Entry],
    files: list[tuple[str, str | None, str]],
    owner: tuple[int, int] | None,
) -> None:
    try:
        names = sorted(os.listdir(source))
    except OSError as exc:
        raise IntegrityError(f"cannot read the image folder {prefix or '/'}: {exc.strerror}") from None
    for name in names:
        rel = prefix + name
        src = f"{source}/{name}"
        dst = None if dest is None else f"{dest}/{name}"
        st = os.lstat(src)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            out.append(Entry(rel, DIRECTORY, mode))
            if dst is not None:
                os.mkdir(dst, 0o700)
            _visit(src, dst, rel + "/", out, files, owner)
        elif stat.S_ISLNK(st.st_mode):
            target = os.readlink(src)
            out.append(Entry(rel, SYMLINK, 0o777, target=target))
            if dst is not None:
                os.symlink(target, dst)
                if owner is not None:
                    os.lchown(dst, *owner)
        elif stat.S_ISREG(st.st_mode):
            files.append((src, dst, rel))
        else:
            raise IntegrityError(f"image changed since the build: {rel} is a special file")


def _file_entry(job: tuple[str, str | None, str], owner: tuple[int, int] | None) -> Entry:
    src, dst, rel = job
    digest, size, mode = _copy_file(src, dst, rel, owner)
    return Entry(rel, FILE, mode, size, digest)


def _copy_file(src: str, dst: str | None, rel: str, owner: tuple[int, int] | None) -> tuple[bytes, int, int]:
    """Hash src and write the very bytes hashed to dst."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise IntegrityError(f"image changed since the build: {rel} cannot be opened ({exc.strerror})") from None
    out_fd = -1
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"image changed since the build: {rel} is no longer a regular file")
        if dst is not None:
            out_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        digest = hashlib.sha256()
        size = 0
        while chunk := os.read(fd, CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if out_fd >= 0:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out_fd, view) :]
        if out_fd >= 0:
            if owner is not None:
                os.fchown(out_fd, *owner)  # before the mode: a chown clears set-id bits
            os.fchmod(out_fd, stat.S_IMODE(st.st_mode))
        return digest.digest(), size, stat.S_IMODE(st.st_mode)
    finally:
        os.close(fd)
        if out_fd >= 0:
            os.close(out_fd)


def add_mount_points(root: Path, targets: list[str]) -> None:
    """Create the empty folders mounts need in the private root (never in the image), never outside it: a
    link in the image on a target's way is followed within the image (cove.image.paths)."""
    for target in list(ALWAYS) + [t.lstrip("/") for t in targets]:
        try:
            make_folder_in_image(root, "/" + target)
        except OSError as exc:
            raise CoveError(f"cannot make mount point /{target}: {exc.strerror}") from None
