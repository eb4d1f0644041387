"""Sealing keys: secrets only an enclave of a given identity on this platform can derive.

As in SGX, a key is derived (HKDF-SHA256) from the platform root secret and
either the enclave's measurement (policy ``mrenclave``) or its signer and
product id (policy ``mrsigner``), plus its debug flag and a security version
number. An enclave with svn S may derive the key of any svn N <= S, never of
a higher one: a patched enclave reads what an older one sealed, an older one
cannot read what a patched one sealed. The svn a key was derived at travels
with the sealed data (for a volume, in its header).

:func:`seal` and :func:`unseal` bind data to the platform alone (no enclave
identity), for host services such as the key broker's master key.
"""

from __future__ import annotations

import os
import struct
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cove.errors import CoveError
from cove.platform.root_secret import root_secret

POLICIES = ("mrenclave", "mrsigner")
KEY_SIZE = 16
_SALT = b"cove sealing v1"
_BLOB_MAGIC = b"COVESEAL\x01"


class SealingError(CoveError):
    """A sealing key was asked for that this enclave may not have, or sealed data is bad."""


class Identity(Protocol):
    """What a sealing key derives from (read-only, so frozen dataclasses fit)."""

    @property
    def measurement(self) -> bytes: ...
    @property
    def signer(self) -> bytes: ...
    @property
    def product_id(self) -> int: ...
    @property
    def svn(self) -> int: ...
    @property
    def debug(self) -> bool: ...


def _field(data: bytes) -> bytes:
    return struct.pack("<H", len(data)) + data


def _derive(info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, _SALT, info).derive(root_secret())


def sealing_key(identity: Identity, policy: str, svn: int | None = None, purpose: bytes = b"") -> bytes:
    """The 16-byte key of ``identity`` under ``policy`` at ``svn`` (default: its own).

    ``purpose`` separates keys of one identity used for different things.
    """
    if policy not in POLICIES:
        raise SealingError(f"unknown sealing policy {policy!r}", f"use one of {', '.join(POLICIES)}")
    svn = identity.svn if svn is None else svn
    if not 0 <= svn <= 0xFFFF:
        raise SealingError(f"svn {svn} is out of range")
    if svn > identity.svn:
        raise SealingError(
            f"data sealed at svn {svn} cannot be unsealed by an enclave with svn {identity.svn}",
            "a lower svn never reads what a higher svn sealed",
        )
    if policy == "mrenclave":
        who = _field(bytes(identity.measurement))
    else:
        who = _field(bytes(identity.signer)) + struct.pack("<H", identity.product_id)
    info = (
        b"cove seal key\0"
        + _field(policy.encode())
        + who
        + struct.pack("<HB", svn, 1 if identity.debug else 0)
        + _field(purpose)
    )
    return _derive(info, KEY_SIZE)


def enclave_keys(identity: Identity) -> dict[str, bytes]:
    """The keys/ folder of /dev/attestation: ``_sgx_mrenclave`` and ``_sgx_mrsigner`` at the enclave's own svn.

    sim's /dev/attestation serves these derivations; the vm launcher sends the same bytes to its guest, so an
    enclave's keys depend on its identity and this platform, not on the backend that runs it.
    """
    return {f"_sgx_{policy}": sealing_key(identity, policy) for policy in POLICIES}


def _platform_key(label: str) -> bytes:
    return _derive(b"cove platform seal\0" + _field(label.encode()), 32)


def seal(data: bytes, label: str) -> bytes:
    """Encrypt ``data`` so that only this platform (its root secret) can read it back."""
    nonce = os.urandom(12)
    return _BLOB_MAGIC + nonce + AESGCM(_platform_key(label)).encrypt(nonce, bytes(data), _BLOB_MAGIC + label.encode())


def unseal(blob: bytes, label: str) -> bytes:
    """The data :func:`seal` sealed under ``label`` on this platform."""
    if not blob.startswith(_BLOB_MAGIC) or len(blob) < len(_BLOB_MAGIC) + 12 + 16:
        raise SealingError("not data sealed by Cove")
    head = len(_BLOB_MAGIC)
    try:
        return AESGCM(_platform_key(label)).decrypt(
            blob[head : head + 12], blob[head + 12 :], _BLOB_MAGIC + label.encode()
        )
    except InvalidTag:
        raise SealingError(
            "sealed data does not open on this platform",
            "it was sealed on another host or under another label, or modified",
        ) from None
