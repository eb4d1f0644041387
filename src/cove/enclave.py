"""The in-enclave Python SDK: evidence and sealing keys from /dev/attestation.

Standard library only, so it runs in any enclave image that has Python (copy
this one file next to the program). It is a thin layer over the files any
language can use: write 64 bytes of report data, read the quote.
"""

from __future__ import annotations

import hashlib
import os

DEVICE = os.environ.get("COVE_ATTESTATION_DIR", "/dev/attestation")
REPORT_DATA_SIZE = 64
SEAL_POLICIES = ("mrenclave", "mrsigner")


class AttestationError(Exception):
    """/dev/attestation is missing, cannot quote, or refused the request."""


def _path(name: str) -> str:
    return os.path.join(DEVICE, name)


def attestation_type() -> str:
    """ "cove" when quotes are available, "none" when the platform cannot make them."""
    try:
        with open(_path("attestation_type"), "rb") as f:
            return f.read().decode().strip()
    except FileNotFoundError:
        raise AttestationError(f"{DEVICE} does not exist: not running in a Cove enclave") from None


def _report_data(data: bytes) -> bytes:
    data = bytes(data)
    if len(data) > REPORT_DATA_SIZE:
        raise AttestationError(f"report data is at most {REPORT_DATA_SIZE} bytes (hash longer data first)")
    return data + bytes(REPORT_DATA_SIZE - len(data))


def _read_bound(name: str, report_data: bytes) -> bytes:
    if attestation_type() == "none":
        raise AttestationError("this platform cannot quote (attestation_type is none); see the cove run warning")
    with open(_path("user_report_data"), "wb", buffering=0) as f:
        f.write(_report_data(report_data))
    with open(_path(name), "rb", buffering=0) as f:
        return f.read()


def get_evidence(report_data: bytes = b"") -> bytes:
    """Evidence (Cove CBOR) binding ``report_data`` (up to 64 bytes, zero-padded)."""
    return _read_bound("quote", report_data)


def get_report(report_data: bytes = b"") -> bytes:
    """The platform-signed report alone (no endorsement), binding ``report_data``."""
    return _read_bound("report", report_data)


def bind(*parts: bytes) -> bytes:
    """64 bytes of report data from arbitrary parts (SHA-512 of their length-prefixed concatenation)."""
    h = hashlib.sha512()
    for part in parts:
        h.update(len(part).to_bytes(8, "big") + part)
    return h.digest()


def get_seal_key(policy: str = "mrenclave") -> bytes:
    """The enclave's 16-byte sealing key: ``mrenclave`` (this measurement) or ``mrsigner`` (signer + product)."""
    if policy not in SEAL_POLICIES:
        raise AttestationError(f"unknown sealing policy {policy!r}: use one of {', '.join(SEAL_POLICIES)}")
    try:
        with open(_path(f"keys/_sgx_{policy}"), "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise AttestationError(f"{DEVICE}/keys has no {policy} key on this platform") from None
