"""The measurement of the installed Cove runtime.

The platform extends a TPM PCR with it, so a verifier learns which Cove
(every file of the installed ``cove`` package) signs the reports. The hash
is SHA-256 over, for each file in path order, its path relative to the
package, a zero byte, the hex SHA-256 of its content and a newline; compiled
caches are left out because they are derived from the sources.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import cove

PACKAGE = Path(cove.__file__).resolve().parent


def _files(root: Path) -> list[Path]:
    return sorted(
        (
            p
            for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def measure(root: Path = PACKAGE) -> bytes:
    """The runtime hash of the package at ``root``."""
    h = hashlib.sha256()
    for path in _files(root):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).hexdigest().encode() + b"\n")
    return h.digest()


@lru_cache(maxsize=1)
def runtime_hash() -> bytes:
    """The installed runtime's hash (computed once per process)."""
    return measure()
