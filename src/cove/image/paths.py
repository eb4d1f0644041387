"""Resolving a path inside an image as the enclave will see it.

Symlinks are followed with the image as root, so an absolute link in an
image never leads to the host's file of that name.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path, PurePosixPath

from cove.errors import CoveError


def resolve_in_image(image: Path, dest: str, follow_last: bool = False) -> Path:
    """The host path of dest inside image, following the image's symlinks within the image."""
    parts = [p for p in PurePosixPath(dest).parts if p != "/"]
    current = PurePosixPath("/")
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = current.parent
            continue
        candidate = current / part
        host = image / str(candidate).lstrip("/")
        if os.path.islink(host) and (parts or follow_last):
            hops += 1
            if hops > 40:
                raise CoveError(f"{dest}: too many symlinks inside the image")
            target = os.readlink(host)
            base = PurePosixPath("/") if target.startswith("/") else current
            parts = [p for p in PurePosixPath(target).parts if p != "/"] + parts
            current = base
            continue
        current = candidate
    return image / str(current).lstrip("/")


def open_in_image(image: Path, dest: str) -> int:
    """A read-only descriptor of dest inside image, for a process that may be root: links are followed
    within the image (:func:`resolve_in_image`), then each component is opened from its folder's descriptor
    without following a link, so nothing outside the image is reached even if the tree changed meanwhile;
    O_NONBLOCK, so a FIFO never waits. The caller checks what it opened."""
    parts = resolve_in_image(image, dest, follow_last=True).relative_to(image).parts
    fd = os.open(image, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for index, part in enumerate(parts):
            kind = os.O_NONBLOCK if index == len(parts) - 1 else os.O_DIRECTORY
            inner = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | kind, dir_fd=fd)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_folder_in_image(image: Path, dest: str) -> None:
    """Make the folder dest (and its missing parents) inside image as the enclave will see it, for a
    process that may be root: links on the way are followed within the image, and each folder is made
    and entered from its parent's descriptor without following a link, so no folder is ever made outside
    the image (an image's link to /root or /etc must not have root make one there). Whatever is already
    at dest (a folder, a file, a link) is left as it is."""
    parts = resolve_in_image(image, dest).relative_to(image).parts
    fd = os.open(image, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for index, part in enumerate(parts):
            try:
                found = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                os.mkdir(part, 0o755, dir_fd=fd)
            else:
                if index == len(parts) - 1:
                    return
                if not stat.S_ISDIR(found.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, f"/{'/'.join(parts[: index + 1])} is not a folder")
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)


def printable(path: str) -> str:
    """A path for a message: bytes that are not UTF-8 shown as \\xNN, so printing it cannot fail."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_name(path: str, source: str | None = None) -> None:
    """Refuse a path that is not valid UTF-8: the manifest and the image listing name files in UTF-8."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        where = source if source is not None else path
        raise CoveError(
            f"{printable(where)}: the name is not valid UTF-8",
            "rename it: image paths are UTF-8 (docs/formats/manifest.md)",
        ) from None
