"""An attestation-key certificate authority: binds a TPM's AK to its EK by credential activation.

An EK can only decrypt, so nothing in a quote proves the AK that signed it
lives in the TPM whose EK certificate came along. This CA closes that gap
once per AK, as a privacy CA does: it checks the EK certificate chain,
checks the AK's attributes (restricted signing key, fixed to the TPM),
encrypts a fresh secret to the EK for the AK's Name (MakeCredential), and
issues an X.509 certificate for the AK only when the TPM gives the secret
back. Verifiers then need just the CA's certificate to trust the AK offline.
The certificate names the EK certificate (SHA-256) and the AK's TPM Name in
subjectAltName URIs, so the AK cannot be paired with another TPM's EK.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cove.attest import certs
from cove.attest._x509 import check_chain_to_any, der, load_der_cert, load_pem_chain, utc
from cove.attest.errors import VerificationError
from cove.attest.makecredential import make_credential, tools_credential_file
from cove.attest.tpm import public_key
from cove.attest.tpm_structs import TpmPublic, parse_public
from cove.errors import CoveError
from cove.util import write_atomic

AK_NAME_URI = "urn:cove:tpm:ak-name:"
EK_CERT_URI = "urn:cove:tpm:ek-cert-sha256:"

# TPMA_OBJECT bits (TPM 2.0 Library, Part 2)
FIXED_TPM, FIXED_PARENT, SENSITIVE_DATA_ORIGIN = 1 << 1, 1 << 4, 1 << 5
RESTRICTED, DECRYPT, SIGN = 1 << 16, 1 << 17, 1 << 18
AK_REQUIRED = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN


def check_ak_attributes(ak: TpmPublic, kind: str = "tpm") -> None:
    """An AK must be a restricted signing key generated in and fixed to its TPM."""
    missing = AK_REQUIRED & ~ak.object_attributes
    if missing or ak.object_attributes & DECRYPT:
        raise VerificationError(
            f"{kind}: attestation key attributes 0x{ak.object_attributes:08x} are not those of an AK "
            "(restricted, sign, fixedTPM, fixedParent, sensitiveDataOrigin, not decrypt)"
        )


def ak_binding(cert: x509.Certificate, kind: str = "cove") -> tuple[bytes, bytes]:
    """(AK TPM Name, SHA-256 of the EK certificate) named by an AK certificate."""
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
    except x509.ExtensionNotFound:
        raise VerificationError(f"{kind}: AK certificate has no subjectAltName binding it to a TPM") from None
    name = [u[len(AK_NAME_URI) :] for u in uris if u.startswith(AK_NAME_URI)]
    ek = [u[len(EK_CERT_URI) :] for u in uris if u.startswith(EK_CERT_URI)]
    if len(name) != 1 or len(ek) != 1:
        raise VerificationError(f"{kind}: AK certificate must name exactly one AK and one EK certificate")
    try:
        return bytes.fromhex(name[0]), bytes.fromhex(ek[0])
    except ValueError:
        raise VerificationError(f"{kind}: AK certificate binding is not hex") from None


@dataclass
class Challenge:
    """What the TPM must answer: ``credential`` is a tpm2_activatecredential input file."""

    credential: bytes
    ak: TpmPublic
    ek_cert: bytes
    _secret: bytes = field(repr=False, default=b"")


class AkCa:
    """The CA: its key, its certificate and the EK roots it accepts."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, ek_roots_pem: bytes):
        self.key = key
        self.cert = cert
        self.ek_roots = load_pem_chain(ek_roots_pem, "tpm", "AK CA's trusted EK roots")

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(cls, directory: Path, ek_roots_pem: bytes, name: str = "Cove AK CA", days: int = 3650) -> AkCa:
        """Make a CA in ``directory``: ca.key (root-only), ca.pem and ek-roots.pem."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        load_pem_chain(ek_roots_pem, "tpm", "EK roots")  # refuse garbage before writing anything
        key = certs.new_key()
        cert = certs.self_signed_ca(key, name, days=days)
        write_atomic(directory / "ca.key", certs.private_key_pem(key), mode=0o600)
        write_atomic(directory / "ca.pem", certs.pem(cert))
        write_atomic(directory / "ek-roots.pem", ek_roots_pem)
        return cls(key, cert, ek_roots_pem)

    @classmethod
    def load(cls, directory: Path) -> AkCa:
        directory = Path(directory)
        try:
            key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
            cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
            roots = (directory / "ek-roots.pem").read_bytes()
        except FileNotFoundError as exc:
            raise CoveError(
                f"AK CA {directory}: {Path(exc.filename).name} is missing",
                "create one with `cove platform ak-ca DIR --ek-roots FILE`",
            ) from None
        except (OSError, ValueError) as exc:
            raise CoveError(f"AK CA {directory}: cannot load: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CoveError(f"AK CA {directory}: ca.key is not an EC key")
        return cls(key, cert, roots)

    def challenge(
        self, ek_chain: Sequence[bytes], ak_public: bytes, now: datetime, ek_public: bytes | None = None
    ) -> Challenge:
        """Check the EK chain and AK, and encrypt a fresh secret to the EK for the AK's Name."""
        now = utc(now, "tpm")
        certs = [load_der_cert(c, "tpm", "EK chain certificate") for c in ek_chain]
        check_chain_to_any(certs, self.ek_roots, now, "tpm", "EK certificate")
        ek_key = certs[0].public_key()
        if not isinstance(ek_key, rsa.RSAPublicKey):
            raise VerificationError("tpm: the EK certificate's key is not RSA (only RSA EKs are supported)")
        bits = 128
        if ek_public is not None:
            ek = parse_public(ek_public)
            if ek.type != "rsa" or int.from_bytes(ek.rsa_modulus, "big") != ek_key.public_numbers().n:
                raise VerificationError("tpm: the EK public area is not the key of the EK certificate")
            bits = ek.symmetric_bits or bits
        ak = parse_public(ak_public)
        check_ak_attributes(ak)
        secret = os.urandom(32)
        id_object, encrypted = make_credential(ek_key, ak.name, secret, symmetric_bits=bits)
        return Challenge(tools_credential_file(id_object, encrypted), ak, der(certs[0]), secret)

    def finish(self, challenge: Challenge, activated: bytes, now: datetime, days: int = 3650) -> tuple[bytes, ...]:
        """The AK certificate chain (DER, AK first) if the TPM recovered the secret."""
        if not challenge._secret or not hmac.compare_digest(challenge._secret, bytes(activated)):
            raise VerificationError("tpm: credential activation failed: the AK is not in the TPM of that EK")
        challenge._secret = b""  # one answer per challenge
        now = utc(now, "tpm")
        ak = challenge.ak
        san = [
            x509.UniformResourceIdentifier(AK_NAME_URI + ak.name.hex()),
            x509.UniformResourceIdentifier(EK_CERT_URI + hashlib.sha256(challenge.ek_cert).hexdigest()),
        ]
        key = public_key(ak)
        if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):  # a TPM key is one of the two
            raise VerificationError(f"tpm: an AK of unsupported type {type(key).__name__}")
        cert = certs.issue_leaf(self.key, self.cert, key, f"Cove AK {ak.name.hex()[4:20]}", days=days, now=now, san=san)
        return (cert.public_bytes(serialization.Encoding.DER), der(self.cert))
