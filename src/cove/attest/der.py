"""A minimal DER reader for Intel's SGX certificate extension.

``cryptography`` hands over unknown extensions as raw bytes; this walks their
TLVs (definite lengths only) and rejects anything malformed with a
:class:`VerificationError`.
"""

from __future__ import annotations

from cove.attest.errors import VerificationError

SEQUENCE, INTEGER, OCTET_STRING, OID, ENUMERATED = 0x30, 0x02, 0x04, 0x06, 0x0A


def tlvs(data: bytes, kind: str = "sgx") -> list[tuple[int, bytes]]:
    """All top-level (tag, content) pairs in ``data``; must consume it exactly."""
    out, pos = [], 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise VerificationError(f"{kind}: truncated DER in certificate extension")
        tag, length = data[pos], data[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 4 or pos + n > len(data):
                raise VerificationError(f"{kind}: bad DER length in certificate extension")
            length = int.from_bytes(data[pos : pos + n], "big")
            pos += n
        if pos + length > len(data):
            raise VerificationError(f"{kind}: truncated DER in certificate extension")
        out.append((tag, data[pos : pos + length]))
        pos += length
    return out


def one(data: bytes, tag: int, kind: str = "sgx") -> bytes:
    """The content of a single TLV with the expected tag."""
    items = tlvs(data, kind)
    if len(items) != 1 or items[0][0] != tag:
        raise VerificationError(f"{kind}: unexpected DER structure in certificate extension")
    return items[0][1]


def oid_text(content: bytes, kind: str = "sgx") -> str:
    """Dotted form of an OBJECT IDENTIFIER's content bytes."""
    if not content or content[-1] & 0x80:
        raise VerificationError(f"{kind}: malformed OID in certificate extension")
    arcs, cur = [], 0
    for b in content:
        cur = cur << 7 | (b & 0x7F)
        if not b & 0x80:
            arcs.append(cur)
            cur = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])


def integer(content: bytes, kind: str = "sgx") -> int:
    if not content or len(content) > 8:
        raise VerificationError(f"{kind}: malformed INTEGER in certificate extension")
    return int.from_bytes(content, "big", signed=True)
