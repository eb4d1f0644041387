"""The measurement of the installed Cove runtime.

The platform extends a TPM PCR with it, so a verifier learns which Cove
(every file of the installed ``cove`` package) signs the reports. The hash
is SHA-256 over, for each file in path order, its path relative to the
package, a zero byte, the hex SHA-256 of its content and a newline; compiled
caches are left out because they are derived from the sources.

Every direct ``cove run`` starts a /dev/attestation server that checks the
endorsement against this hash, so hashing every file each time (about 10 ms)
is avoided by a cache of each file's digest keyed by its (path, size,
mtime_ns, inode, ctime_ns, device), kept in the platform's root-only folder
(``runtime-hash.json``, written atomically, read through cove.decode). A
file whose content changes gets a new ctime (no caller can set it), so its
digest is computed again; a file whose stat matches keeps its digest. A file
changed less than a second before the scan is not cached (as git treats a
"racy" index entry): the kernel's clock is coarse, so a second change within
the same tick could keep the same ctime. Who
can write that folder can already replace the platform key, so the cache
trusts nobody new (docs/attestation.md, "The runtime measurement").
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import cove

PACKAGE = Path(cove.__file__).resolve().parent
CACHE_NAME = "runtime-hash.json"
CACHE_LIMIT = 1 << 20
RACY_NS = 1_000_000_000  # a file changed this close to a scan could change again within the same clock tick
_CACHE_VERSION = 1


def _files(root: Path) -> list[Path]:
    return sorted(
        (
            p
            for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def _combine(entries: list[tuple[str, str]]) -> bytes:
    """The runtime hash of (relative path, hex content digest) pairs, sorted by path."""
    h = hashlib.sha256()
    for rel, digest in entries:
        h.update(rel.encode() + b"\0")
        h.update(digest.encode() + b"\n")
    return h.digest()


def measure(root: Path = PACKAGE) -> bytes:
    """The runtime hash of the package at ``root`` (every file read)."""
    return _combine(
        [(p.relative_to(root).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest()) for p in _files(root)]
    )


def _stats(root: Path) -> list[tuple[str, str]]:
    """(relative path, stat key) of every file :func:`_files` lists, in its order, by os.scandir (pathlib's
    rglob and a stat each cost about 10 ms here): directories are entered unless symbolic links, files are
    followed, compiled caches left out."""
    out: list[tuple[str, str]] = []
    pending = [("", os.fspath(root))]
    while pending:
        prefix, folder = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name == "__pycache__":
                    continue
                rel = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    pending.append((rel + "/", entry.path))
                elif entry.is_file() and not entry.name.endswith((".pyc", ".pyo")):
                    st = entry.stat()
                    out.append((rel, f"{st.st_size} {st.st_mtime_ns} {st.st_ino} {st.st_ctime_ns} {st.st_dev}"))
    out.sort()
    return out


def _trusted_folder(folder: Path) -> bool:
    """A folder only its owner (root, or the user running this) can write: the platform's own."""
    try:
        st = os.stat(folder)
    except OSError:
        return False
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022


def _read_cache(path: Path, root: Path) -> dict[str, str]:
    """stat key + path -> hex digest, from the cache file; an unreadable or foreign one is empty."""
    from cove.decode import Fields, decode_json

    try:
        data = path.read_bytes()
        what = "the runtime hash cache"
        fields = Fields(decode_json(data, ValueError, what, limit=CACHE_LIMIT), what, ValueError)
        if fields.integer("version") != _CACHE_VERSION or fields.text("package", max_len=4096) != str(root):
            return {}
        cached: dict[str, str] = {}
        for entry in fields.strings("files", max_items=65536, max_len=8192):
            digest, _, rest = entry.partition(" ")
            if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
                return {}
            cached[rest] = digest
        return cached
    except (OSError, ValueError):
        return {}


def measure_cached(folder: Path, root: Path = PACKAGE) -> bytes:
    """The runtime hash of ``root``, reading only files whose stat changed since the cache in ``folder``.

    The cache is used and refreshed only when ``folder`` is writable by its owner alone; otherwise (or if it
    cannot be written) this is :func:`measure`.
    """
    if not _trusted_folder(folder):
        return measure(root)
    import time

    path = Path(folder) / CACHE_NAME
    settled = time.time_ns() - RACY_NS
    cached = _read_cache(path, root)
    entries: list[tuple[str, str]] = []
    lines: list[str] = []
    changed = False
    for rel, key in _stats(root):
        stamp = f"{key} {rel}"
        digest = cached.get(stamp)
        if digest is None:
            digest = hashlib.sha256((root / rel).read_bytes()).hexdigest()
            changed = True
        entries.append((rel, digest))
        if int(key.split(" ")[3]) < settled:
            lines.append(f"{digest} {stamp}")
    if changed or len(lines) != len(cached):
        import json

        from cove.util import write_atomic

        document = {"version": _CACHE_VERSION, "package": str(root), "files": lines}
        try:
            write_atomic(path, json.dumps(document).encode(), mode=0o600, sync=False)
        except OSError:
            pass  # a read-only folder: the hash is right, the next run reads the files again
    return _combine(entries)


@lru_cache(maxsize=1)
def runtime_hash() -> bytes:
    """The installed runtime's hash (computed once per process, through the platform folder's cache)."""
    from cove.platform.state import platform_dir

    return measure_cached(platform_dir())
