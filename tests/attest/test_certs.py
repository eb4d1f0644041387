"""The one certificate helper: its CAs are CAs, its leaves chain to them and are not, validity and SAN hold.

Chains are checked by cryptography's own path validator (the same WebPKI rules a TLS client applies),
not by re-reading the fields the helper wrote.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from cove.attest import certs
from cove.kbs.tls import make_local_tls

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def ca():
    key = certs.new_key()
    return key, certs.self_signed_ca(key, "Test CA", days=30, now=NOW)


def leaf_for(ca, **kw):
    key, cert = ca
    kw.setdefault("san", [x509.DNSName("svc.example"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    kw.setdefault("extended_usage", [ExtendedKeyUsageOID.SERVER_AUTH])
    return certs.issue_leaf(key, cert, certs.new_key().public_key(), "svc", now=NOW, **kw)


def server_verify(ca_cert, leaf, name="svc.example", at=NOW + timedelta(days=1), intermediates=()):
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([ca_cert]))
        .time(at)
        .build_server_verifier(x509.DNSName(name))
    )
    return verifier.verify(leaf, list(intermediates))


def test_the_ca_is_a_ca(ca):
    key, cert = ca
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign and not usage.value.digital_signature
    assert (
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        == x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    )
    cert.verify_directly_issued_by(cert)
    assert cert.not_valid_before_utc == NOW - certs.BACKDATE
    assert cert.not_valid_after_utc == NOW + timedelta(days=30)


def test_the_leaf_chains_to_the_ca_and_is_not_a_ca(ca):
    leaf = leaf_for(ca)
    assert server_verify(ca[1], leaf)[-1] == ca[1]
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert constraints.critical and not constraints.value.ca
    assert usage.digital_signature and not usage.key_cert_sign and not usage.crl_sign
    assert (
        leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
        == ca[1].extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    )
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["svc.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_a_leaf_never_outlives_its_issuer(ca):
    leaf = leaf_for(ca, days=365)
    assert leaf.not_valid_before_utc == NOW - certs.BACKDATE
    assert leaf.not_valid_after_utc == ca[1].not_valid_after_utc
    with pytest.raises(verification.VerificationError):
        server_verify(ca[1], leaf, at=NOW + timedelta(days=31))


@pytest.mark.parametrize("abuse", ["leaf-as-issuer", "other-ca", "wrong-name", "tampered"])
def test_forged_chains_are_refused(ca, abuse):
    leaf = leaf_for(ca)
    intermediates = ()
    name = "svc.example"
    if abuse == "leaf-as-issuer":  # a leaf's key signs another leaf: the leaf is not a CA
        leaf_key = certs.new_key()
        middle = certs.issue_leaf(
            ca[0], ca[1], leaf_key.public_key(), "middle", now=NOW, san=[x509.DNSName("middle.example")]
        )
        leaf = certs.issue_leaf(
            leaf_key,
            middle,
            certs.new_key().public_key(),
            "svc",
            now=NOW,
            san=[x509.DNSName("svc.example")],
            extended_usage=[ExtendedKeyUsageOID.SERVER_AUTH],
        )
        intermediates = (middle,)
    elif abuse == "other-ca":
        other_key = certs.new_key()
        leaf = leaf_for((other_key, certs.self_signed_ca(other_key, "Test CA", days=30, now=NOW)))
    elif abuse == "wrong-name":
        name = "other.example"
    elif abuse == "tampered":
        der = bytearray(leaf.public_bytes(serialization.Encoding.DER))
        der[-10] ^= 1  # inside the signature
        leaf = x509.load_der_x509_certificate(bytes(der))
    with pytest.raises(verification.VerificationError):
        server_verify(ca[1], leaf, name, intermediates=intermediates)


def test_local_tls_files_verify_as_a_server_chain(tmp_path):
    ca_path, cert_path, key_path = make_local_tls(tmp_path / "tls")
    ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
    leaf, *rest = x509.load_pem_x509_certificates(cert_path.read_bytes())
    at = datetime.now(timezone.utc)
    for name in ("localhost", "127.0.0.1"):
        subject = x509.IPAddress(ipaddress.ip_address(name)) if name[0].isdigit() else x509.DNSName(name)
        verifier = (
            verification.PolicyBuilder().store(verification.Store([ca_cert])).time(at).build_server_verifier(subject)
        )
        assert verifier.verify(leaf, rest)[-1] == ca_cert
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
