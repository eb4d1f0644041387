"""Decoding untrusted CBOR into checked fields.

cbor2 raises many exception types on hostile input and happily returns any
shape; every access here checks type and size, so a malformed document ends
in one :class:`VerificationError` naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cbor2

from cove.attest.errors import VerificationError

MAX_DOCUMENT = 1 << 20  # evidence is a few KiB; refuse anything absurd before decoding


def loads(data: bytes, kind: str, what: str) -> Any:
    """Decode one CBOR item; any failure (or trailing bytes) is a VerificationError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise VerificationError(f"{kind}: {what} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_DOCUMENT:
        raise VerificationError(f"{kind}: {what} is {len(data)} bytes (at most {MAX_DOCUMENT})")
    try:
        import io

        stream = io.BytesIO(data)
        value = cbor2.CBORDecoder(stream).decode()
        if stream.tell() != len(data):
            raise VerificationError(f"{kind}: {len(data) - stream.tell()} trailing bytes after {what}")
        return value
    except VerificationError:
        raise
    except Exception as exc:  # cbor2 raises many types (CBORDecodeError, ValueError, RecursionError, ...)
        raise VerificationError(f"{kind}: {what} is not valid CBOR ({type(exc).__name__})") from None


class Fields:
    """Typed access to one CBOR map; ``strict`` refuses keys nobody reads."""

    def __init__(self, value: Any, kind: str, what: str, allowed: tuple[str, ...] | None = None):
        if not isinstance(value, Mapping):
            raise VerificationError(f"{kind}: {what} must be a map")
        self.map = value
        self.kind = kind
        self.what = what
        if allowed is not None:
            for key in value:
                if key not in allowed:
                    raise VerificationError(f"{kind}: {what} has an unknown field {str(key)[:40]!r}")

    def _get(self, key: str, optional: bool) -> Any:
        if key not in self.map:
            if optional:
                return None
            raise VerificationError(f"{self.kind}: {self.what} lacks {key}")
        return self.map[key]

    def has(self, key: str) -> bool:
        return key in self.map

    def bytes(self, key: str, size: int | None = None, *, max_size: int = 65536, optional: bool = False) -> bytes:
        value = self._get(key, optional)
        if value is None and optional:
            return None  # type: ignore[return-value]
        if not isinstance(value, bytes):
            raise VerificationError(f"{self.kind}: {self.what} {key} must be a byte string")
        if size is not None and len(value) != size:
            raise VerificationError(f"{self.kind}: {self.what} {key} must be {size} bytes, not {len(value)}")
        if len(value) > max_size:
            raise VerificationError(f"{self.kind}: {self.what} {key} is too long ({len(value)} bytes)")
        return value

    def text(self, key: str, choices: tuple[str, ...] | None = None, max_len: int = 256) -> str:
        value = self._get(key, False)
        if not isinstance(value, str) or len(value) > max_len:
            raise VerificationError(f"{self.kind}: {self.what} {key} must be a short text string")
        if choices is not None and value not in choices:
            raise VerificationError(f"{self.kind}: {self.what} {key} {value[:40]!r} is not one of {', '.join(choices)}")
        return value

    def uint(self, key: str, maximum: int = 2**64 - 1) -> int:
        value = self._get(key, False)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
            raise VerificationError(f"{self.kind}: {self.what} {key} must be an integer from 0 to {maximum}")
        return value

    def boolean(self, key: str) -> bool:
        value = self._get(key, False)
        if not isinstance(value, bool):
            raise VerificationError(f"{self.kind}: {self.what} {key} must be true or false")
        return value

    def sub(self, key: str, allowed: tuple[str, ...] | None = None, optional: bool = False) -> Fields | None:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        return Fields(value, self.kind, f"{self.what} {key}", allowed)

    def byte_list(self, key: str, *, max_items: int = 16, max_size: int = 16384) -> tuple[bytes, ...]:
        value = self._get(key, False)
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= max_items:
            raise VerificationError(f"{self.kind}: {self.what} {key} must be a list of 1 to {max_items} byte strings")
        if not all(isinstance(v, bytes) and len(v) <= max_size for v in value):
            raise VerificationError(f"{self.kind}: {self.what} {key} must hold byte strings")
        return tuple(value)
