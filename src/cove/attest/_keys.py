"""Loading public keys and checking signatures with clear failure messages.

Wraps ``cryptography`` so that every bad key or bad signature becomes a
:class:`VerificationError` naming the evidence type and the item checked.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cove.attest.errors import VerificationError

HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def load_public_key(data: bytes | str, kind: str, what: str) -> PublicKeyTypes:
    """A public key from PEM or DER (SubjectPublicKeyInfo)."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return serialization.load_pem_public_key(raw)
        return serialization.load_der_public_key(raw)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise VerificationError(f"{kind}: {what} is not a valid public key ({exc})") from None


def p256_from_raw(xy: bytes, kind: str, what: str) -> ec.EllipticCurvePublicKey:
    """A P-256 key from the 64-byte x||y form used in DCAP quotes."""
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + xy)
    except ValueError:
        raise VerificationError(f"{kind}: {what} is not a point on P-256") from None


def raw_ecdsa_to_der(rs: bytes) -> bytes:
    """An r||s big-endian ECDSA signature in DER form."""
    half = len(rs) // 2
    return encode_dss_signature(int.from_bytes(rs[:half], "big"), int.from_bytes(rs[half:], "big"))


def verify_ecdsa(key: PublicKeyTypes, signature_der: bytes, data: bytes, hash_name: str, kind: str, what: str) -> None:
    """ECDSA verify or raise '<kind>: <what> signature invalid'."""
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise VerificationError(f"{kind}: {what} needs an EC key, got {type(key).__name__}")
    try:
        key.verify(signature_der, data, ec.ECDSA(HASHES[hash_name]()))
    except (InvalidSignature, ValueError):
        raise VerificationError(f"{kind}: {what} signature invalid") from None


def verify_rsa(
    key: PublicKeyTypes, signature: bytes, data: bytes, hash_name: str, pss: bool, kind: str, what: str
) -> None:
    """RSA PKCS#1 v1.5 or PSS verify or raise '<kind>: <what> signature invalid'."""
    if not isinstance(key, rsa.RSAPublicKey):
        raise VerificationError(f"{kind}: {what} needs an RSA key, got {type(key).__name__}")
    h = HASHES[hash_name]()
    pad = padding.PSS(padding.MGF1(h), padding.PSS.AUTO) if pss else padding.PKCS1v15()
    try:
        key.verify(signature, data, pad, h)
    except (InvalidSignature, ValueError):
        raise VerificationError(f"{kind}: {what} signature invalid") from None
