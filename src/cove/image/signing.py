"""The developer's signing key and the manifest signature.

Keys are Ed25519 (PKCS#8 PEM, mode 0600). The signer identity (MRSIGNER of
this world) is SHA-256 over the raw 32-byte public key, so it does not depend
on how the key file is encoded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cove.decode import Fields, decode_cbor
from cove.errors import CoveError, IntegrityError
from cove.util import write_atomic

ALGORITHM = "Ed25519"


def default_key_path() -> Path:
    """Where `cove keygen` and `cove build` keep the developer's key by default."""
    base = os.environ.get("COVE_KEY") or None
    if base:
        return Path(base)
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config_home / "cove" / "signing-key.pem"


def generate_key(path: Path, overwrite: bool = False) -> Ed25519PrivateKey:
    """Create a new Ed25519 key at path (mode 0600); refuse to overwrite."""
    if path.exists() and not overwrite:
        raise CoveError(f"{path} already exists", "pass --force to replace it, or choose --out")
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, pem, mode=0o600)
    return key


def load_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CoveError(f"signing key {path} not found", "create one with `cove keygen`") from None
    except OSError as exc:
        raise CoveError(f"cannot read signing key {path}: {exc.strerror}") from None
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CoveError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CoveError(f"{path} is not an Ed25519 key", "create one with `cove keygen`")
    return key


def raw_public(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes (serialization's Encoding.Raw, without loading that module: ~6 ms on create's path)."""
    return key.public_bytes_raw()


def signer_of(public_key_raw: bytes) -> bytes:
    """The signer identity: SHA-256 of the raw public key."""
    return hashlib.sha256(public_key_raw).digest()


@dataclass(frozen=True)
class Signature:
    """A detached signature over the manifest bytes."""

    public_key: bytes  # raw Ed25519, 32 bytes
    signature: bytes  # 64 bytes

    @property
    def signer(self) -> bytes:
        return signer_of(self.public_key)

    def encode(self) -> bytes:
        return cbor2.dumps({"alg": ALGORITHM, "key": self.public_key, "sig": self.signature}, canonical=True)

    @classmethod
    def decode(cls, data: bytes) -> Signature:
        """Parse signature bytes; anything malformed is an integrity failure."""
        item = Fields(
            decode_cbor(data, _malformed, "manifest signature", limit=4096),
            "manifest signature",
            _malformed,
            ("alg", "key", "sig"),
        )
        item.text("alg", (ALGORITHM,))
        return cls(item.bytes("key", 32), item.bytes("sig", 64))


def _malformed(message: str) -> IntegrityError:
    return IntegrityError(message, "rebuild with `cove build`")


def sign(key: Ed25519PrivateKey, message: bytes) -> Signature:
    return Signature(raw_public(key.public_key()), key.sign(message))


def verify(signature: Signature, message: bytes) -> None:
    """Raise IntegrityError unless signature is valid over message."""
    try:
        Ed25519PublicKey.from_public_bytes(signature.public_key).verify(signature.signature, message)
    except InvalidSignature:
        raise IntegrityError(
            "manifest signature is invalid: the manifest or its signature was altered",
            "rebuild and re-sign with `cove build`",
        ) from None
