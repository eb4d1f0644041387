"""The platform attestation key (PAK): ECDSA P-256, root-only, sealed to the TPM when there is one.

The PAK signs every enclave report, so its private part never leaves the
platform monitor: without a TPM it is a 0600 file in the platform folder;
with one, only the TPM-sealed blobs are kept on disk and the key exists in
memory only while the monitor signs.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cove.errors import CoveError
from cove.platform.state import Paths
from cove.util import write_atomic

if TYPE_CHECKING:  # a self-certified platform's key loads without the TPM tools
    from cove.platform.tpm2 import Tpm


def generate() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def spki(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    """The public key as SubjectPublicKeyInfo DER (what the platform key hash covers)."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def save(paths: Paths, key: ec.EllipticCurvePrivateKey, tpm: Tpm | None) -> None:
    """Store the key: sealed by the TPM if given, else as a root-only PEM file."""
    if tpm is not None:
        scalar = key.private_numbers().private_value.to_bytes(32, "big")
        public, private = tpm.seal(scalar)
        write_atomic(paths.pak_sealed_pub, public, mode=0o600)
        write_atomic(paths.pak_sealed_priv, private, mode=0o600)
        paths.pak.unlink(missing_ok=True)
    else:
        write_atomic(
            paths.pak,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            mode=0o600,
        )
        paths.pak_sealed_pub.unlink(missing_ok=True)
        paths.pak_sealed_priv.unlink(missing_ok=True)
    write_atomic(paths.pak_public, spki(key), mode=0o644)


def public(paths: Paths) -> bytes:
    try:
        return paths.pak_public.read_bytes()
    except FileNotFoundError:
        raise CoveError("the platform has no attestation key", "run `cove platform init`") from None


def load(paths: Paths, tpm: Tpm | None) -> ec.EllipticCurvePrivateKey:
    """The private key (unsealed by the TPM when it is sealed); checked against the public file."""
    try:
        if paths.pak_sealed_pub.exists():
            if tpm is None:
                raise CoveError(
                    "the platform key is sealed to a TPM but no TPM is configured", "run `cove platform init --force`"
                )
            scalar = tpm.unseal(paths.pak_sealed_pub.read_bytes(), paths.pak_sealed_priv.read_bytes())
            key = ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1())
        else:
            loaded = serialization.load_pem_private_key(paths.pak.read_bytes(), None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise CoveError(f"{paths.pak} is not an EC key", "run `cove platform init --force`")
            key = loaded
    except FileNotFoundError:
        raise CoveError("the platform has no attestation key", "run `cove platform init`") from None
    except PermissionError:
        raise CoveError("the platform key is readable by root only", "run as root") from None
    except ValueError as exc:
        raise CoveError(f"the platform key is damaged: {exc}", "run `cove platform init --force`") from None
    if not hmac.compare_digest(spki(key), public(paths)):
        raise CoveError("the platform key does not match its public key file", "run `cove platform init --force`")
    return key
