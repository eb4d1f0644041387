"""The platform root secret: the one secret every sealing key derives from.

It lives in a root-only file, ``root-secret`` in the platform folder
(``/var/lib/cove/platform``, or ``$COVE_PLATFORM_DIR``), made on first use from
the OS CSPRNG. Everything reaches it through :func:`root_secret`, so a later
version can keep it sealed to the TPM (unsealed only in a measured boot state)
without touching a caller.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from cove.errors import CoveError

DEFAULT_DIR = "/var/lib/cove/platform"
FILE_NAME = "root-secret"
SIZE = 32


class PlatformError(CoveError):
    """The platform folder or its root secret is missing, unsafe or unreadable."""


def platform_dir() -> Path:
    """The platform folder (``$COVE_PLATFORM_DIR`` overrides the default)."""
    return Path(os.environ.get("COVE_PLATFORM_DIR") or DEFAULT_DIR)


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) if needed; refuse one others can write or enter."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.stat(path)
    except OSError as exc:
        raise PlatformError(
            f"cannot create the platform folder {path}: {exc.strerror}",
            "run as root, or set COVE_PLATFORM_DIR to a folder you own",
        ) from None
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PlatformError(
            f"{path} is not private (owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})",
            f"chown it to uid {os.geteuid()} and chmod 700",
        )
    return path


def _read(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PlatformError(f"cannot read the platform root secret {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise PlatformError(
                f"{path} is not a private file (mode {stat.S_IMODE(st.st_mode):o})",
                "it must be a regular file owned by you with mode 600",
            )
        data = os.read(fd, SIZE + 1)
    finally:
        os.close(fd)
    if len(data) != SIZE:
        raise PlatformError(
            f"{path} holds {len(data)} bytes, not {SIZE}", "restore it from a backup; every sealed volume depends on it"
        )
    return data


def _create(path: Path) -> None:
    """Write a new secret under a temporary name and link it in; a racing creator wins cleanly."""
    fd, tmp = tempfile.mkstemp(prefix=f".{FILE_NAME}.", suffix=".tmp", dir=path.parent)
    try:
        os.write(fd, os.urandom(SIZE))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process made one first: keep theirs
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def root_secret() -> bytes:
    """The platform root secret, created on first use."""
    path = ensure_private_dir(platform_dir()) / FILE_NAME
    data = _read(path)
    if data is None:
        _create(path)
        data = _read(path)
        if data is None:  # removed by another process between the two steps
            raise PlatformError(f"the platform root secret {path} went away as it was made")
    return data
