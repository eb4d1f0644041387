"""Resolving a path inside an image as the enclave will see it.

Symlinks are followed with the image as root, so an absolute link in an
image never leads to the host's file of that name.
"""

from __future__ import annotations

import os
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
