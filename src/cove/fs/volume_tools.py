"""Offline work on a volume or protected file on the host: open it checked, list, verify, size, forget.

What `cove fs` does beyond parsing and printing lives here, next to the
volume it inspects, so the CLI is a skin over it and other front ends (tests,
an operator's script) get the same checks and the same one-line errors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cove.errors import CoveError
from cove.fs import anchor, transfer
from cove.fs.access import Identity, open_volume
from cove.fs.volume import Volume


def require_input(path: Path) -> Path:
    """``path`` if something (even a dangling link) is there; else a one-line error."""
    if not os.path.lexists(path):
        raise CoveError(f"{path}: no such file or folder")
    return path


def open_checked(
    path: Path, key_text: str, identity: Identity | None, *, writable: bool = False, check_anchor: bool = True
) -> Volume:
    """Open a volume; read-only unless asked (no writer lock, no re-wrap, nothing changed on disk)."""
    if not transfer.is_volume(path):
        raise CoveError(f"{path} is not a Cove volume", "give the folder that holds its root file")
    return open_volume(str(path), key_text, identity, writable=writable, check_anchor=check_anchor)


def host_size(path: Path) -> int:
    """Bytes of a host file, or of the regular files below a host folder (a progress bar's total)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def content_size(volume: Volume) -> int:
    """Bytes of all the files in a volume, as its index records them."""
    return sum(node.size for _, node in volume.walk() if node.kind == "f")


@dataclass(frozen=True)
class Listed:
    """One entry of a volume listing: its path in the volume, st_mode, size and link target."""

    path: str
    mode: int
    size: int
    target: str | None = None


def listing(volume: Volume, inside: str = "/") -> list[Listed]:
    """The entry at ``inside``, or every entry below it if it is a folder (folders before their content)."""
    try:
        start = volume.resolve(inside)
    except FileNotFoundError:
        raise CoveError(f"{inside}: not in the volume") from None
    base = inside.rstrip("/")
    entries = (
        [(base or "/", start)] if start.kind != "d" else [(f"{base}{path}", node) for path, node in volume.walk(start)]
    )
    return [
        Listed(
            path,
            node.mode,
            volume.file_size(node),
            os.fsdecode(node.target) if node.kind == "l" and node.target is not None else None,
        )
        for path, node in entries
    ]


@dataclass(frozen=True)
class Verified:
    """What checking every byte of a volume found."""

    problems: list[str]
    recovered: list[str]  # interrupted commits that opening finished or rolled back
    files: int
    size: int
    version: int
    label: str


def verify(volume: Volume) -> Verified:
    """Read every file of ``volume`` through its MAC tree and count what is there."""
    problems = volume.verify()
    files = [node for _, node in volume.walk() if node.kind == "f"]
    return Verified(
        problems, list(volume.recovered), len(files), sum(node.size for node in files), volume.version, volume.label
    )


def forget(volume_dir: Path) -> list[str]:
    """Drop this platform's rollback records of a deliberately deleted volume; the records removed."""
    if os.path.exists(volume_dir) and os.listdir(volume_dir):
        raise CoveError(f"{volume_dir} still holds a volume", "delete it first; forget only discards records")
    removed = anchor.forget_records(str(volume_dir.absolute()))
    if not removed:
        raise CoveError(f"this platform has no record of a volume at {volume_dir.absolute()}")
    return removed
