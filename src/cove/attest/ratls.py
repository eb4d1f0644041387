"""RA-TLS: TLS certificates whose key is bound to attestation evidence, and ssl contexts that check them.

The certificate carries the evidence in the TCG DICE tagged-evidence
extension (OID 2.23.133.5.4.9), as Gramine 1.8+ does: CBOR tag 60000 around
``[evidence, claims]``, where ``claims`` is a CBOR map whose ``pubkey-hash``
is ``[hash-alg-id, hash of the certificate's SubjectPublicKeyInfo]`` (IANA
named-information ids: 1 SHA-256, 7 SHA-384, 8 SHA-512), and the evidence's
report data is SHA-256(claims) followed by 32 zero bytes. A verifier
recomputes both, so the evidence vouches for the very key that completes
the TLS handshake.

Python's ``ssl`` has no certificate-verification callback, so the check
runs right after the handshake, before any application data: a
:class:`RaTlsContext` makes :class:`RaTlsSocket` objects whose
``do_handshake`` verifies the peer's certificate against a policy and
closes the connection if it is not accepted. For a server to request a
client certificate at all, OpenSSL must accept its chain; Cove's RA-TLS
certificates are therefore issued by a fixed, publicly derivable "issuer"
key (see :func:`issuer_certificate`). That signature proves nothing and is
not meant to: trust comes only from the evidence check, which always runs.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from collections.abc import Callable
from datetime import datetime, timezone
from functools import lru_cache
from typing import TYPE_CHECKING

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from cove.attest import certs
from cove.attest._cbor import Fields, loads
from cove.attest._x509 import PARSE_ERRORS
from cove.attest.errors import VerificationError
from cove.attest.policy import Policy

if TYPE_CHECKING:
    from cove.attest.verifier import Inputs, Verdict

OID_TAGGED_EVIDENCE = x509.ObjectIdentifier("2.23.133.5.4.9")
CBOR_TAG = 60000
HASH_IDS = {1: "sha256", 7: "sha384", 8: "sha512"}
_ISSUER_SEED = b"cove ra-tls issuer v1 (public by design: trust comes from the evidence)"

EvidenceSource = Callable[[bytes], bytes]  # report data (64 bytes) -> evidence


def spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def claims_for(public_key: PublicKeyTypes, hash_id: int = 1) -> bytes:
    """The CBOR claims map binding ``public_key``."""
    digest = hashlib.new(HASH_IDS[hash_id], spki(public_key)).digest()
    return cbor2.dumps({"pubkey-hash": cbor2.dumps([hash_id, digest])}, canonical=True)


def report_data_for(claims: bytes) -> bytes:
    return hashlib.sha256(claims).digest() + bytes(32)


@lru_cache(maxsize=1)
def _issuer() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256 order
    scalar = int.from_bytes(hashlib.sha256(_ISSUER_SEED).digest(), "big") % (n - 1) + 1
    key = ec.derive_private_key(scalar, ec.SECP256R1())
    cert = certs.self_signed_ca(
        key,
        "Cove RA-TLS issuer (unverified; see the evidence)",
        serial=1,
        not_before=datetime(2000, 1, 1, tzinfo=timezone.utc),
        not_after=datetime(9999, 12, 31, tzinfo=timezone.utc),
    )
    return key, cert


def issuer_certificate() -> bytes:
    """PEM of the RA-TLS issuer: loaded as a trust anchor only so OpenSSL lets the handshake finish."""
    return certs.pem(_issuer()[1])


def make_certificate(
    get_evidence: EvidenceSource,
    key: ec.EllipticCurvePrivateKey | None = None,
    *,
    common_name: str = "Cove RA-TLS",
    days: int = 1,
    hostnames: tuple[str, ...] = ("localhost",),
) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM): a fresh key, bound to evidence ``get_evidence`` makes."""
    key = key or certs.new_key()
    claims = claims_for(key.public_key())
    evidence = get_evidence(report_data_for(claims))
    ext = cbor2.dumps(cbor2.CBORTag(CBOR_TAG, [evidence, claims]))
    issuer_key, issuer = _issuer()
    cert = certs.issue_leaf(
        issuer_key,
        issuer,
        key.public_key(),
        common_name,
        days=days,
        extended_usage=[x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH],
        san=[x509.DNSName(h) for h in hostnames],
        extensions=[x509.UnrecognizedExtension(OID_TAGGED_EVIDENCE, ext)],
    )
    return certs.pem(cert), certs.private_key_pem(key)


def looks_like_certificate(data: bytes) -> bool:
    head = bytes(data[:64]).lstrip()
    return head.startswith(b"-----BEGIN CERTIFICATE") or (
        data[:1] == b"\x30" and len(data) > 100 and _parses_as_cert(data)
    )


def _parses_as_cert(data: bytes) -> bool:
    try:
        x509.load_der_x509_certificate(bytes(data))
        return True
    except ValueError:
        return False


def evidence_from_certificate(data: bytes) -> tuple[bytes, bytes]:
    """(evidence, the report data it must bind) from an RA-TLS certificate (PEM or DER)."""
    try:
        raw = bytes(data)
        cert = (
            x509.load_pem_x509_certificate(raw)
            if raw.lstrip().startswith(b"-----BEGIN")
            else x509.load_der_x509_certificate(raw)
        )
        ext = cert.extensions.get_extension_for_oid(OID_TAGGED_EVIDENCE).value
        public_key = cert.public_key()
    except x509.ExtensionNotFound:
        raise VerificationError("ra-tls: the certificate has no tagged-evidence extension (2.23.133.5.4.9)") from None
    except PARSE_ERRORS as exc:
        # cryptography's documented failures on malformed DER, repeated extensions, unknown names or key types
        raise VerificationError(f"ra-tls: not a valid certificate ({type(exc).__name__})") from None
    value = ext.value if isinstance(ext, x509.UnrecognizedExtension) else b""
    tagged = loads(value, "ra-tls", "tagged evidence")
    if not isinstance(tagged, cbor2.CBORTag) or tagged.tag != CBOR_TAG:
        raise VerificationError(f"ra-tls: tagged evidence is not CBOR tag {CBOR_TAG}")
    body = tagged.value
    if not (isinstance(body, (list, tuple)) and len(body) == 2 and all(isinstance(v, bytes) for v in body)):
        raise VerificationError("ra-tls: tagged evidence must be [evidence, claims] byte strings")
    evidence, claims = body
    f = Fields(loads(claims, "ra-tls", "claims"), "ra-tls", "claims")
    entry = loads(f.bytes("pubkey-hash", max_size=128), "ra-tls", "pubkey-hash")
    if not (
        isinstance(entry, (list, tuple))
        and len(entry) == 2
        and type(entry[0]) is int  # a list is unhashable
        and entry[0] in HASH_IDS
        and isinstance(entry[1], bytes)
    ):
        raise VerificationError("ra-tls: pubkey-hash must be [hash id 1, 7 or 8, hash]")
    want = hashlib.new(HASH_IDS[entry[0]], spki(public_key)).digest()
    if not hmac.compare_digest(want, entry[1]):
        raise VerificationError("ra-tls: the claims' pubkey-hash is not the certificate's key")
    return evidence, report_data_for(claims)


def verify_certificate(
    data: bytes, policy: Policy | None = None, *, now: datetime | None = None, inputs: Inputs | None = None
) -> Verdict:
    """Verify an RA-TLS certificate's evidence and key binding; a Verdict (check ``.accepted``)."""
    from cove.attest.verifier import Inputs, appraise

    evidence, report_data = evidence_from_certificate(data)
    return appraise(evidence, policy, report_data=report_data, now=now, inputs=inputs or Inputs())


class RaTlsError(ssl.SSLError):
    """The peer's RA-TLS certificate was invalid or not accepted by the policy."""

    def line(self) -> str:
        return str(self.args[0]) if self.args else "ra-tls: peer rejected"


class RaTlsSocket(ssl.SSLSocket):
    """An SSLSocket that appraises the peer's certificate as soon as the handshake ends."""

    verdict: Verdict | None = None

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        ctx = self.context
        if isinstance(ctx, RaTlsContext) and ctx.peer_policy is not None:
            try:
                self.verdict = ctx.check_peer(self)
            except BaseException:
                self.close()
                raise


class RaTlsContext(ssl.SSLContext):
    """An SSLContext that presents an RA-TLS certificate and/or requires an accepted one from the peer."""

    sslsocket_class = RaTlsSocket
    peer_policy: Policy | None = None
    peer_inputs: Inputs | None = None

    def check_peer(self, sock: ssl.SSLSocket) -> Verdict:
        der = sock.getpeercert(binary_form=True)
        if not der:
            raise RaTlsError("ra-tls: the peer presented no certificate")
        try:
            verdict = verify_certificate(der, self.peer_policy, inputs=self.peer_inputs)
        except VerificationError as exc:
            raise RaTlsError(f"ra-tls: peer evidence invalid: {exc.line()}") from None
        if not verdict.accepted:
            raise RaTlsError(
                f"ra-tls: peer rejected by policy {verdict.result.policy_id}: " + "; ".join(verdict.result.reasons)
            )
        return verdict


def _context(
    protocol: int, cert_pem: bytes | None, key_pem: bytes | None, peer_policy: Policy | None, peer_inputs: Inputs | None
) -> RaTlsContext:
    ctx = RaTlsContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_pem is not None:
        if key_pem is None:
            raise ValueError("ra-tls: a certificate without its private key")
        import os
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:  # ssl loads keys from files only
            cert_file, key_file = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
            with open(cert_file, "wb") as f:
                f.write(cert_pem)
            with open(os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(key_pem)
            ctx.load_cert_chain(cert_file, key_file)
    ctx.peer_policy = peer_policy
    ctx.peer_inputs = peer_inputs
    return ctx


def server_context(
    cert_pem: bytes, key_pem: bytes, *, client_policy: Policy | None = None, client_inputs: Inputs | None = None
) -> RaTlsContext:
    """A server presenting ``cert_pem``; with ``client_policy``, clients must present an accepted RA-TLS cert."""
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, cert_pem, key_pem, client_policy, client_inputs)
    if client_policy is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=issuer_certificate().decode())
        # Certificates from other RA-TLS stacks are self-signed; OpenSSL would refuse them here.
    return ctx


def client_context(
    server_policy: Policy,
    *,
    cert_pem: bytes | None = None,
    key_pem: bytes | None = None,
    server_inputs: Inputs | None = None,
) -> RaTlsContext:
    """A client that accepts a server only if its RA-TLS certificate satisfies ``server_policy``.

    Give ``cert_pem``/``key_pem`` (an RA-TLS certificate) for mutual attestation.
    """
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, cert_pem, key_pem, server_policy, server_inputs)
    ctx.check_hostname = False  # the peer is identified by its evidence, not by a name
    ctx.verify_mode = ssl.CERT_NONE  # chain trust is irrelevant; the evidence check follows the handshake
    return ctx
