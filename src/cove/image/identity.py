"""The enclave's identity as the signed build states it.

The build writes it (measurement and signer from the signed manifest, the
rest from the measured cove.toml) and the runtime hands it to backends and
services; it lives here, below both, so neither has to import the other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EnclaveIdentity:
    """Who the enclave is, taken from the verified manifest, never from the enclave."""

    name: str
    measurement: bytes
    signer: bytes
    product_id: int
    svn: int
    debug: bool
