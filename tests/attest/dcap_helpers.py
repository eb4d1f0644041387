"""Vectors, times and tampering helpers for the SGX/TDX tests."""

from __future__ import annotations

import base64
from datetime import datetime, timezone

from attest_vectors import collateral, vector
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

ROOT = vector("intel_sgx_root_ca.pem")
# One hour after each TCB info's issueDate: inside every collateral window.
CASES = {
    "sgx": ("sgx/quote.bin", "sgx/collateral.json", datetime(2025, 6, 19, 11, 56, 11, tzinfo=timezone.utc)),
    "tdx": ("tdx/quote.bin", "tdx/collateral.json", datetime(2025, 6, 19, 11, 16, 3, tzinfo=timezone.utc)),
    "tdx_outdated": (
        "tdx/quote_outdated.bin",
        "tdx/collateral_outdated.json",
        datetime(2026, 2, 18, 11, 58, 51, tzinfo=timezone.utc),
    ),
}
TODAY = datetime(2026, 11, 15, tzinfo=timezone.utc)


def case(name: str):
    q, c, t = CASES[name]
    return vector(q), collateral(c), t


def pem_block(der: bytes) -> bytes:
    b = base64.b64encode(der)
    return (
        b"-----BEGIN CERTIFICATE-----\n"
        + b"\n".join(b[i : i + 64] for i in range(0, len(b), 64))
        + b"\n-----END CERTIFICATE-----\n"
    )


def flip_in_pem_chain(quote: bytes, index: int, xor: int) -> bytes:
    """Flip one DER byte of one certificate of the quote's PCK chain, keeping every length."""
    start = quote.index(b"-----BEGIN CERTIFICATE-----")
    end = quote.rindex(b"-----END CERTIFICATE-----\n") + len(b"-----END CERTIFICATE-----\n")
    pem = quote[start:end]
    ders = [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(pem)]
    assert b"".join(pem_block(d) for d in ders) == pem, "chain PEM layout changed"
    total = sum(map(len, ders))
    index %= total
    for k, d in enumerate(ders):
        if index < len(d):
            b = bytearray(d)
            b[index] ^= xor
            ders[k] = bytes(b)
            break
        index -= len(d)
    return quote[:start] + b"".join(pem_block(d) for d in ders) + quote[end:]


def pem_start(quote: bytes) -> int:
    return quote.index(b"-----BEGIN CERTIFICATE-----")
