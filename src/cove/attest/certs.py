"""The certificates Cove issues: one self-signed CA builder and one leaf issuer, with one set of defaults.

Every CA Cove makes (the broker's, the local TLS CA, the AK CA, the RA-TLS issuer) and every leaf
(TLS server, released key, AK, RA-TLS) is built here, so they agree: P-256 keys, SHA-256 signatures,
validity starting five minutes back (clock skew), CAs with BasicConstraints cA=true pathLen=0
(critical), keyCertSign+cRLSign (critical) and a SubjectKeyIdentifier; leaves with cA=false
(critical), a KeyUsage (critical; digitalSignature unless the caller needs more), an
AuthorityKeyIdentifier, and never outliving their issuer. Callers add what their format needs
(SAN, EKU, evidence extensions).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PrivateKeyTypes
from cryptography.x509.oid import NameOID

CA_DAYS = 3650
LEAF_DAYS = 825  # the CA/Browser Forum's old ceiling; short-lived leaves pass their own
BACKDATE = timedelta(minutes=5)

CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def key_usage(
    *, digital_signature: bool = True, key_encipherment: bool = False, key_agreement: bool = False
) -> x509.KeyUsage:
    """A leaf's KeyUsage: digitalSignature by default; never keyCertSign or cRLSign."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def name(common_name: str, *more: x509.NameAttribute[str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name), *more])


def private_key_pem(key: PrivateKeyTypes) -> bytes:
    """PKCS#8 PEM, unencrypted (callers write it owner-only or seal it)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _validity(
    now: datetime | None, days: int, not_before: datetime | None, not_after: datetime | None
) -> tuple[datetime, datetime]:
    now = now or datetime.now(timezone.utc)
    return (not_before or now - BACKDATE), (not_after or now + timedelta(days=days))


def self_signed_ca(
    key: ec.EllipticCurvePrivateKey,
    subject: str | x509.Name,
    *,
    days: int = CA_DAYS,
    now: datetime | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    serial: int | None = None,
) -> x509.Certificate:
    """A self-signed CA certificate that may sign leaves only (pathLen 0)."""
    subject = name(subject) if isinstance(subject, str) else subject
    start, end = _validity(now, days, not_before, not_after)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def issue_leaf(
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate,
    public_key: CertificatePublicKeyTypes,
    subject: str | x509.Name,
    *,
    days: int = LEAF_DAYS,
    now: datetime | None = None,
    usage: x509.KeyUsage | None = None,
    extended_usage: Iterable[x509.ObjectIdentifier] = (),
    san: Iterable[x509.GeneralName] = (),
    extensions: Iterable[x509.ExtensionType] = (),
) -> x509.Certificate:
    """A leaf (cA=false) for ``public_key`` signed by ``issuer``; it ends no later than its issuer.

    ``extensions`` are added non-critical, after the standard ones (e.g. evidence or claim OIDs).
    """
    subject = name(subject) if isinstance(subject, str) else subject
    start, end = _validity(now, days, None, None)
    end = min(end, issuer.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage or key_usage(), critical=True)
    )
    extended_usage = list(extended_usage)
    if extended_usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(extended_usage), critical=False)
    san = list(san)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())
