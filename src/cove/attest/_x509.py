"""Certificate loading and chain checks shared by the SGX/TDX and SNP verifiers.

``cryptography`` verifies each signature; this module adds the validity-window
and issuer checks at a caller-given time, checks every issuer as a CA (RFC 5280
6.1.4: BasicConstraints cA=true, keyCertSign where KeyUsage is present, path
length), optionally pins a vendor chain's shape (its length and each
certificate's common name), and turns every failure into a
:class:`VerificationError` naming the certificate. Without the CA check, any
end-entity key under a vendor root (an extracted PCK key) could issue a
"TCB Signing" certificate.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from collections.abc import Sequence
from datetime import datetime, timezone

import re

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from cove.attest.errors import VerificationError

# What cryptography documents for malformed certificates and CRLs: bad DER or PEM, an unknown
# version, a repeated extension, an unsupported name or key type. Untrusted input that raises one of
# these is a rejection; anything else is a bug and must surface.
PARSE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    UnsupportedAlgorithm,
)


def utc(now: datetime, kind: str) -> datetime:
    """The verification time as an aware UTC datetime; naive times are refused."""
    if not isinstance(now, datetime) or now.tzinfo is None:
        raise VerificationError(f"{kind}: verification time must be a timezone-aware datetime")
    return now.astimezone(timezone.utc)


def _name(cert: x509.Certificate) -> str:
    try:
        attrs = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else cert.subject.rfc4514_string()
    except ValueError:
        return "certificate"


def _parsed(cert: x509.Certificate) -> x509.Certificate:
    """Force the lazily parsed fields now, so a malformed one fails at load time."""
    cert.subject.rfc4514_string()
    cert.issuer.rfc4514_string()
    _ = cert.not_valid_before_utc, cert.not_valid_after_utc, cert.signature_hash_algorithm
    _ = list(cert.extensions)
    cert.public_key()
    raw = cert.public_bytes(serialization.Encoding.DER)
    # The signature BIT STRING's unused-bits byte is outside what is signed, and parsers ignore it:
    # anything but 0 is not DER, and would let the same certificate travel as different bytes.
    if raw[len(raw) - len(cert.signature) - 1] != 0:
        raise ValueError("the signature BIT STRING has unused bits")
    return cert


def load_der_cert(der: bytes, kind: str, what: str) -> x509.Certificate:
    """One DER certificate. AMD's VCEKs have serial 0, which cryptography only warns about."""
    try:
        return _der_cached(bytes(der))
    except PARSE_ERRORS as exc:  # a malformed certificate from untrusted input is a rejection
        raise VerificationError(f"{kind}: {what} is not a valid DER certificate ({exc})") from None


def load_pem_chain(pem: bytes | str, kind: str, what: str) -> list[x509.Certificate]:
    """All certificates in a PEM bundle, in file order; at least one."""
    raw = pem.encode() if isinstance(pem, str) else bytes(pem)
    try:
        certs = list(_pem_cached(raw))
    except PARSE_ERRORS as exc:  # a malformed certificate from untrusted input is a rejection
        raise VerificationError(f"{kind}: {what} is not a valid PEM certificate chain ({exc})") from None
    if not certs:
        raise VerificationError(f"{kind}: {what} holds no certificate")
    return certs


# Certificates are immutable, so parsed ones are kept (by their exact bytes) for
# the next verification: trust anchors and platform chains recur. Signatures and
# validity windows are still checked every time.
@lru_cache(maxsize=512)
def _der_cached(der: bytes) -> x509.Certificate:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _parsed(x509.load_der_x509_certificate(der))


@lru_cache(maxsize=256)
def _pem_cached(pem: bytes) -> tuple[x509.Certificate, ...]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tuple(_parsed(c) for c in x509.load_pem_x509_certificates(pem))


def check_validity(cert: x509.Certificate, now: datetime, kind: str, what: str | None = None) -> None:
    """Reject a certificate outside its notBefore/notAfter window."""
    if now < cert.not_valid_before_utc:
        raise VerificationError(
            f"{kind}: {what or _name(cert)} certificate not valid before {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}"
        )
    if now > cert.not_valid_after_utc:
        raise VerificationError(
            f"{kind}: {what or _name(cert)} certificate expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
        )


def check_issued_by(cert: x509.Certificate, issuer: x509.Certificate, kind: str, what: str | None = None) -> None:
    """Reject unless ``issuer`` is named as and signed ``cert``."""
    try:
        cert.verify_directly_issued_by(issuer)
    except InvalidSignature:
        raise VerificationError(f"{kind}: {what or _name(cert)} certificate signature invalid") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise VerificationError(
            f"{kind}: {what or _name(cert)} certificate is not issued by {_name(issuer)} ({exc})"
        ) from None


def check_ca(issuer: x509.Certificate, below: int, kind: str) -> None:
    """Reject an issuer that is not a CA, may not sign certificates, or has more CAs below it than its path length.

    ``below``: the CA certificates between ``issuer`` and the end entity.
    """
    name = _name(issuer)
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise VerificationError(f"{kind}: {name} issued a certificate but is not a CA (no BasicConstraints)") from None
    if not constraints.ca:
        raise VerificationError(f"{kind}: {name} issued a certificate but is not a CA (BasicConstraints cA=false)")
    if constraints.path_length is not None and below > constraints.path_length:
        raise VerificationError(
            f"{kind}: {name} has {below} CA certificate(s) below it, more than its path "
            f"length {constraints.path_length}"
        )
    try:
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise VerificationError(f"{kind}: {name} issued a certificate but its key usage lacks keyCertSign")


def check_shape(chain: Sequence[x509.Certificate], shape: Sequence[str], kind: str, what: str) -> None:
    """Leaf-first ``chain`` (root included) must have one certificate per pattern, each CN matching its pattern."""
    names = [_name(c) for c in chain]
    if len(chain) != len(shape) or not all(re.fullmatch(p, n) for p, n in zip(shape, names)):
        raise VerificationError(
            f"{kind}: {what} chain is {' <- '.join(reversed(names))[:300]}, not the vendor's "
            f"shape {' <- '.join(reversed(shape))}"
        )


def check_chain(
    chain: Sequence[x509.Certificate],
    root: x509.Certificate,
    now: datetime,
    kind: str,
    shape: Sequence[str] | None = None,
    what: str = "certificate",
) -> None:
    """Leaf-first ``chain`` must end in ``root`` (byte-equal), each link signed by a CA and in date.

    ``shape``: the common-name patterns of the whole chain, leaf first, root last.
    """
    if not chain:
        raise VerificationError(f"{kind}: empty certificate chain")
    if der(chain[-1]) != der(root):
        # The chain may omit the root; then its last certificate must be issued by it.
        chain = list(chain) + [root]
    if shape is not None:
        check_shape(chain, shape, kind, what)
    for below, (cert, issuer) in enumerate(zip(chain, chain[1:])):
        check_issued_by(cert, issuer, kind)
        check_ca(issuer, below, kind)
    check_issued_by(root, root, kind, "root CA")
    for cert in chain:
        check_validity(cert, now, kind)


@lru_cache(maxsize=1024)
def der(cert: x509.Certificate) -> bytes:
    """A certificate's DER bytes, for exact comparison with a trust anchor."""
    return cert.public_bytes(serialization.Encoding.DER)


def check_chain_to_any(
    chain: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: datetime,
    kind: str,
    what: str,
    shape: Sequence[str] | None = None,
) -> x509.Certificate:
    """Leaf-first ``chain`` must end in (or be issued by) one of ``roots``; returns that root.

    Roots are tried by name, then by signature: two CAs may share a name.
    """
    if not chain:
        raise VerificationError(f"{kind}: {what} chain is empty")
    top = chain[-1]
    problem = None
    for root in roots:
        if der(top) == der(root) or top.issuer == root.subject:
            try:
                check_chain(chain, root, now, kind, shape, what)
                return root
            except VerificationError as exc:
                problem = exc
                if "signature invalid" not in exc.message and "is not issued by" not in exc.message:
                    raise
    raise VerificationError(
        f"{kind}: {what} chain is not rooted in a trusted CA (it ends in "
        f"{top.issuer.rfc4514_string()[:120]}{', whose key differs' if problem else ''})",
        "add its CA to the policy, or check where the evidence came from",
    )
