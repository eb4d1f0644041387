"""Hashing an image tree into entries and one root hash.

An entry records what the enclave can observe of a path (its type, permission
bits, size, content hash, symlink target) and nothing the host changes
freely (mtime, owner, inode), so the same content gives the same root hash on
any machine. The root hash is SHA-256 over the canonical CBOR encoding of the
sorted entry list; ``docs/formats/manifest.md`` writes it down.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator

import cbor2

from cove.decode import Fields, decode_cbor
from cove.errors import CoveError, IntegrityError
from cove.image.paths import check_name

FILE, DIRECTORY, SYMLINK = "f", "d", "l"
CHUNK = 1 << 20


@dataclass(frozen=True, order=True)
class Entry:
    """One path of the image, as the enclave sees it."""

    path: str  # relative, '/'-separated, never empty
    type: str  # FILE, DIRECTORY or SYMLINK
    mode: int  # permission bits (st_mode & 0o7777)
    size: int = 0
    digest: bytes = b""  # SHA-256 of the content, files only
    target: str = ""  # symlink target, symlinks only

    def encode(self) -> list:
        return [self.path, self.type, self.mode, self.size, self.digest, self.target]

    @classmethod
    def decode(cls, item: object) -> Entry:
        """One listed entry (six items, each of its type); anything else is an integrity failure."""
        if not isinstance(item, list) or len(item) != 6:
            raise _malformed("image listing entry must be a list of six items")
        fields = Fields(dict(zip(_FIELDS, item)), "image listing entry", _malformed)
        return cls(
            fields.text("path", max_len=_NAME_MAX),
            fields.text("type", (FILE, DIRECTORY, SYMLINK)),
            fields.integer("mode", 0, 0o7777),
            fields.uint("size"),
            fields.bytes("digest"),
            fields.text("target", max_len=_NAME_MAX),
        )


_FIELDS = ("path", "type", "mode", "size", "digest", "target")
_NAME_MAX = 1 << 16  # a path or link target, far beyond what the kernel allows
LISTING_LIMIT = 1 << 28  # a listing grows with the image: 256 MiB is millions of paths


def _malformed(message: str) -> IntegrityError:
    return IntegrityError(message, "rebuild with `cove build`")


def root_hash(entries: list[Entry]) -> bytes:
    """The image's root hash: SHA-256 over the canonical encoding of the entries."""
    return hashlib.sha256(encode_entries(entries)).digest()


def encode_entries(entries: list[Entry]) -> bytes:
    return cbor2.dumps([e.encode() for e in sorted(entries)], canonical=True)


def decode_entries(data: bytes) -> list[Entry]:
    """Parse a listing (build/image.tree); anything malformed is an integrity failure."""
    items = decode_cbor(data, _malformed, "image listing (build/image.tree)", limit=LISTING_LIMIT)
    if not isinstance(items, list):
        raise _malformed("image listing (build/image.tree) must be a list")
    return [Entry.decode(item) for item in items]


def walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Yield (relative path, lstat) for every path below root, sorted, depth first."""

    def visit(directory: Path, prefix: str) -> Iterator[tuple[str, os.stat_result]]:
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            raise CoveError(f"cannot list {directory}: {exc.strerror}") from None
        for name in names:
            rel = f"{prefix}{name}"
            full = directory / name
            check_name(rel, str(full))
            st = os.lstat(full)
            yield rel, st
            if stat.S_ISDIR(st.st_mode):
                yield from visit(full, rel + "/")

    yield from visit(root, "")


def copy_hashing(source: int, out: int) -> tuple[bytes, int]:
    """Copy descriptor source to out through Python: SHA-256 and size of exactly the bytes written."""
    digest = hashlib.sha256()
    size = 0
    while chunk := os.read(source, CHUNK):
        digest.update(chunk)
        size += len(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(out, view) :]
    return digest.digest(), size


def hash_file(path: Path, sink: Callable[[bytes], object] | None = None) -> tuple[bytes, int]:
    """SHA-256 and size of a file read once through O_NOFOLLOW; sink gets every chunk."""
    digest = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if sink is not None:
                sink(chunk)
    finally:
        os.close(fd)
    return digest.digest(), size


def entry_for(
    root: Path,
    rel: str,
    st: os.stat_result,
    digest_of: Callable[[Path, str, os.stat_result], tuple[bytes, int]] | None = None,
) -> Entry:
    """Describe one path; digest_of lets callers supply a cached or copying hasher."""
    full = root / rel
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        return Entry(rel, DIRECTORY, mode)
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(full)
        check_name(target, f"image/{rel} -> {target}")
        return Entry(rel, SYMLINK, 0o777, target=target)
    if stat.S_ISREG(st.st_mode):
        digest, size = digest_of(full, rel, st) if digest_of else hash_file(full)
        return Entry(rel, FILE, mode, size, digest)
    raise CoveError(
        f"image/{rel}: special files (devices, fifos, sockets) cannot be in an image",
        "remove it; /dev is provided inside the enclave",
    )


def difference(expected: list[Entry], actual: list[Entry]) -> str | None:
    """One line naming the first difference between two listings, or None."""
    want = {e.path: e for e in expected}
    have = {e.path: e for e in actual}
    for path in sorted(set(want) | set(have)):
        old, new = want.get(path), have.get(path)
        if old == new:
            continue
        if new is None:
            return f"{path} was removed"
        if old is None:
            return f"{path} was added"
        if old.type != new.type:
            return f"{path} changed type"
        if old.digest != new.digest or old.size != new.size:
            return f"{path} was modified (content differs)"
        if old.mode != new.mode:
            return f"{path} changed mode from {old.mode:o} to {new.mode:o}"
        if old.target != new.target:
            return f"{path} now points to {new.target}"
    return None
