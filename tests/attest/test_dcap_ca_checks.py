"""Intel chains: every issuer must be a CA, and each chain must have Intel's shape.

The attack: whoever holds any end-entity key under the Intel root (an
extracted PCK key) issues a "TCB Signing" certificate and signs TCB info that
calls a revoked platform UpToDate. The broker takes collateral from the
client, so this must fail on the chain alone. The hierarchy is made here with
``cryptography`` (Intel's keys are not ours); the TCB info is the real one.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from dcap_helpers import case

from cove.attest._x509 import check_chain
from cove.attest.dcap import PCK_SHAPE, TCB_SIGNING_SHAPE, verify_signed_collateral
from cove.attest.dcap_collateral import parse_collateral
from cove.attest.errors import VerificationError

SGX_Q, SGX_C, SGX_T = case("sgx")
START = datetime(2020, 1, 1, tzinfo=timezone.utc)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "Intel Corporation"),
            x509.NameAttribute(x509.NameOID.COMMON_NAME, cn),
        ]
    )


def _issue(cn, key, issuer_cn, issuer_key, *, ca, path_length=None, cert_sign=True):
    usage = x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=not ca,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca and cert_sign,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(issuer_cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(START)
        .not_valid_after(START + timedelta(days=20000))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(usage, critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


class Hierarchy:
    """Root -> Platform CA -> PCK, and a TCB Signing certificate, like Intel's, with our keys."""

    def __init__(self):
        self.keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("root", "ca", "pck", "tcb")}
        k = self.keys
        self.root = _issue("Intel SGX Root CA", k["root"], "Intel SGX Root CA", k["root"], ca=True, path_length=1)
        self.ca = _issue("Intel SGX PCK Platform CA", k["ca"], "Intel SGX Root CA", k["root"], ca=True, path_length=0)
        self.pck = _issue("Intel SGX PCK Certificate", k["pck"], "Intel SGX PCK Platform CA", k["ca"], ca=False)
        self.tcb = _issue("Intel SGX TCB Signing", k["tcb"], "Intel SGX Root CA", k["root"], ca=False)
        crl = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.root.subject)
            .last_update(START)
            .next_update(START + timedelta(days=20000))
        )
        self.crl = crl.sign(k["root"], hashes.SHA256())

    def sign(self, key_name: str, data: bytes) -> bytes:
        r, s = decode_dss_signature(self.keys[key_name].sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@pytest.fixture(scope="module")
def intel():
    return Hierarchy()


@pytest.fixture(scope="module")
def tcb_info_raw():
    return parse_collateral(SGX_C).tcb_info.raw


def test_genuine_shape_verifies(intel, tcb_info_raw):
    """The control: a TCB Signing certificate from the root verifies, so the refusals below are the checks."""
    verify_signed_collateral(
        tcb_info_raw,
        intel.sign("tcb", tcb_info_raw),
        [intel.tcb, intel.root],
        intel.root,
        intel.crl,
        SGX_T,
        "sgx",
        "TCB info",
    )
    check_chain([intel.pck, intel.ca, intel.root], intel.root, SGX_T, "sgx", PCK_SHAPE)


def test_tcb_signing_issued_by_a_pck_key_is_refused(intel, tcb_info_raw):
    forged_key = ec.generate_private_key(ec.SECP256R1())
    forged = _issue("Intel SGX TCB Signing", forged_key, "Intel SGX PCK Certificate", intel.keys["pck"], ca=False)
    r, s = decode_dss_signature(forged_key.sign(tcb_info_raw, ec.ECDSA(hashes.SHA256())))
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    chain = [forged, intel.pck, intel.ca, intel.root]
    with pytest.raises(VerificationError, match="TCB info signing chain is .* not the vendor's shape"):
        verify_signed_collateral(tcb_info_raw, signature, chain, intel.root, intel.crl, SGX_T, "sgx", "TCB info")
    # Without the shape pin, the CA check alone refuses it.
    with pytest.raises(
        VerificationError,
        match=r"Intel SGX PCK Certificate issued a certificate but is not a CA "
        r"\(BasicConstraints cA=false\)",
    ):
        check_chain(chain, intel.root, SGX_T, "sgx")


def test_issuer_without_key_cert_sign_or_past_its_path_length_is_refused(intel):
    k = intel.keys
    no_sign = _issue("Intel SGX PCK Platform CA", k["ca"], "Intel SGX Root CA", k["root"], ca=True, cert_sign=False)
    with pytest.raises(VerificationError, match="key usage lacks keyCertSign"):
        check_chain([intel.pck, no_sign, intel.root], intel.root, SGX_T, "sgx")
    extra_key = ec.generate_private_key(ec.SECP256R1())
    extra = _issue("Intel SGX PCK Processor CA", extra_key, "Intel SGX PCK Platform CA", k["ca"], ca=True)
    leaf = _issue("Intel SGX PCK Certificate", k["pck"], "Intel SGX PCK Processor CA", extra_key, ca=False)
    with pytest.raises(VerificationError, match="more than its path length 0"):
        check_chain([leaf, extra, intel.ca, intel.root], intel.root, SGX_T, "sgx")
    with pytest.raises(VerificationError, match="PCK certificate chain is .* not the vendor's shape"):
        check_chain([leaf, extra, intel.ca, intel.root], intel.root, SGX_T, "sgx", PCK_SHAPE, "PCK certificate")


def test_real_chains_have_intel_shapes():
    from cove.attest._x509 import check_shape, load_pem_chain
    from cove.attest.dcap_quote import parse_dcap_quote

    col = parse_collateral(SGX_C)
    check_shape(list(col.tcb_info_chain), TCB_SIGNING_SHAPE, "sgx", "TCB info signing")
    check_shape(load_pem_chain(parse_dcap_quote(SGX_Q).cert.pck_chain_pem, "sgx", "PCK"), PCK_SHAPE, "sgx", "PCK")
