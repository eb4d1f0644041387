"""Small helpers shared by every part of Cove."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from pathlib import Path


def die_with_parent(signum: int) -> None:
    """Have the kernel send signum to this process when its parent (thread) ends (PR_SET_PDEATHSIG), for a
    helper that must not outlive what started it; a preexec_fn or a child's first step. Fails loudly."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signum, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
        error = ctypes.get_errno()
        raise OSError(error, f"prctl PR_SET_PDEATHSIG: {os.strerror(error)}")


def write_atomic(path: Path, data: bytes, mode: int = 0o644, sync: bool = True) -> None:
    """Write data to path so readers see the old file or the new one, never a mix.

    ``sync=False`` skips the fsync, for state a crash of the machine makes moot anyway
    (a running process's status): readers still never see a mix.
    """
    import tempfile  # here: tempfile and random are ~3 ms of every importer's start (cove-runtime create)

    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # name the file the user asked for, not the temporary one
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def entry_point_allows(program: str, entry_points: Iterable[str]) -> bool:
    """Whether [process] entry_points admit PROGRAM: a prefix ending in / admits that folder, else one path.

    Only an absolute, normalised path can be admitted: the kernel resolves
    ".." and a prefix match does not ("/opt/app/../../bin/sh" starts with
    "/opt/app/"), so callers normalise first and exec what they checked.
    """
    if not program.startswith("/") or posixpath.normpath(program) != program:
        return False
    return any(program.startswith(p) if p.endswith("/") else program == p for p in entry_points)
