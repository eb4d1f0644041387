"""Errors of the encrypted file format and of volumes.

Every tamper, whatever it hits, surfaces as one type, :class:`FileIntegrityError`,
so callers (the FUSE layer, the volume layer) need one ``except`` to refuse a
file; the message names the part that failed so a human can tell what happened.
A volume as a whole (its root, key or anchor) fails with
:class:`VolumeIntegrityError`.
"""

from __future__ import annotations

from cove.errors import CoveError, IntegrityError

_TAMPER_HINT = "the file was modified outside Cove, or the key is wrong; restore it from a backup"


class FileIntegrityError(IntegrityError):
    """A protected file failed a check: MAC, path binding, layout or size.

    A wrong key cannot be told apart from a tampered metadata node in this
    format (both show up as "metadata MAC mismatch"), so there is no separate
    wrong-key error.
    """

    def __init__(self, message: str, hint: str | None = _TAMPER_HINT):
        super().__init__(message, hint)


class ProtectedFileError(CoveError):
    """A protected file was used wrongly (closed, read-only, bad argument)."""


class VolumeError(CoveError):
    """A volume cannot be used as asked (not a volume, in use, wrong label...)."""


class VolumeIntegrityError(IntegrityError):
    """A volume failed a check as a whole: its root, its key or its anchor."""
