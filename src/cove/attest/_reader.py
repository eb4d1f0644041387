"""A bounds-checked cursor over bytes.

Parsers of untrusted evidence use it so that short or malformed input always
ends in a :class:`VerificationError` naming the field, never an IndexError or
struct.error.
"""

from __future__ import annotations

from cove.attest.errors import VerificationError


class Reader:
    """Reads fixed and length-prefixed fields; raises on truncation."""

    __slots__ = ("data", "pos", "kind", "big")

    def __init__(self, data: bytes, kind: str, *, big_endian: bool):
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise VerificationError(f"{kind}: evidence must be bytes, got {type(data).__name__}")
        self.data = bytes(data)
        self.pos = 0
        self.kind = kind
        self.big = big_endian

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise VerificationError(
                f"{self.kind}: truncated at {what} (needs {n} bytes at offset {self.pos}, {self.remaining()} left)"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big" if self.big else "little")

    def u8(self, what: str) -> int:
        return self.uint(1, what)

    def u16(self, what: str) -> int:
        return self.uint(2, what)

    def u32(self, what: str) -> int:
        return self.uint(4, what)

    def u64(self, what: str) -> int:
        return self.uint(8, what)

    def sized(self, prefix: int, what: str) -> bytes:
        """A field preceded by its length (prefix bytes wide)."""
        return self.take(self.uint(prefix, f"{what} size"), what)

    def end(self, what: str) -> None:
        if self.remaining():
            raise VerificationError(f"{self.kind}: {self.remaining()} trailing bytes after {what}")
