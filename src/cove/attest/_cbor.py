"""Untrusted CBOR in attest: :mod:`cove.decode` bound to :class:`VerificationError`.

Every rejection names the evidence type first (``kind: ...``), as all of
attest's errors do; the decoding and the field checks themselves are the one
way Cove reads untrusted data (:mod:`cove.decode`).
"""

from __future__ import annotations

from collections.abc import Collection

from cove.attest.errors import VerificationError
from cove.decode import MAX_DOCUMENT, Error, Fields as _Fields, decode_cbor

__all__ = ["MAX_DOCUMENT", "Fields", "loads", "rejection"]


def rejection(kind: str) -> Error:
    """The error class for evidence of ``kind``: a VerificationError starting with the kind."""

    def error(message: str) -> VerificationError:
        return VerificationError(f"{kind}: {message}")

    return error


def loads(data: bytes, kind: str, what: str) -> object:
    """Decode one CBOR item; any failure (or trailing bytes) is a VerificationError."""
    return decode_cbor(data, rejection(kind), what)


def Fields(value: object, kind: str, what: str, allowed: Collection[str] | None = None) -> _Fields:  # noqa: N802
    """Typed access to one CBOR map of ``kind`` evidence; ``allowed`` refuses keys nobody reads."""
    return _Fields(value, what, rejection(kind), allowed)
