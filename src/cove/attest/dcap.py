"""Verify Intel SGX and TDX DCAP quotes against PCS collateral.

Every check of Intel's quote verification is done here with ``cryptography``
at a caller-given time: PCK chain to the Intel SGX root, both CRLs, TCB info
and QE identity (signatures, windows, matching), the QE report and its
binding to the attestation key, and the quote signature.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from cove.attest._keys import p256_from_raw, raw_ecdsa_to_der, verify_ecdsa
from cove.attest._x509 import check_chain, check_chain_to_any, load_pem_chain, utc
from cove.attest.dcap_collateral import DcapCollateral, parse_collateral
from cove.attest.dcap_quote import DcapQuote, EnclaveReport, TdReport, parse_dcap_quote
from cove.attest.dcap_tcb import appraise
from cove.attest.errors import VerificationError
from cove.attest.pck import PckExtension, parse_pck_extension


# Intel's chain shapes, leaf first; the root is whichever trusted root CA the chain ends in.
PCK_SHAPE = ("Intel SGX PCK Certificate", "Intel SGX PCK (Platform|Processor) CA", ".+")
TCB_SIGNING_SHAPE = ("Intel SGX TCB Signing", ".+")


@dataclass(frozen=True)
class DcapClaims:
    """A verified quote: the TEE, its report body and the platform's TCB verdict."""

    tee: str  # "sgx" or "tdx"
    quote: DcapQuote
    body: EnclaveReport | TdReport
    report_data: bytes
    tcb_status: str
    advisory_ids: tuple[str, ...]
    tcb_date: str
    platform_status: str
    qe_status: str
    tdx_module_status: str | None
    fmspc: bytes
    pck: PckExtension


def _stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _window(start: datetime, end: datetime | None, now: datetime, kind: str, what: str) -> None:
    if now < start:
        raise VerificationError(f"{kind}: {what} not valid before {_stamp(start)}")
    if end is None or now > end:
        raise VerificationError(
            f"{kind}: {what} expired at {_stamp(end) if end else 'an unknown time'}",
            "fetch fresh collateral from the PCS/PCCS",
        )


def _check_crl(
    crl: x509.CertificateRevocationList, issuer: x509.Certificate, now: datetime, kind: str, what: str
) -> None:
    if crl.issuer != issuer.subject:
        raise VerificationError(f"{kind}: {what} is not issued by the certificate's CA")
    key = issuer.public_key()
    try:
        ok = isinstance(
            key,
            (
                dsa.DSAPublicKey,
                rsa.RSAPublicKey,
                ec.EllipticCurvePublicKey,
                ed25519.Ed25519PublicKey,
                ed448.Ed448PublicKey,
            ),
        ) and crl.is_signature_valid(key)
    except (ValueError, TypeError, UnsupportedAlgorithm):  # an unsupported or mismatched key or algorithm
        ok = False
    if not ok:
        raise VerificationError(f"{kind}: {what} signature invalid")
    _window(crl.last_update_utc, crl.next_update_utc, now, kind, what)


def _not_revoked(crl: x509.CertificateRevocationList, cert: x509.Certificate, kind: str, what: str) -> None:
    if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
        raise VerificationError(f"{kind}: {what} certificate is revoked")


def verify_signed_collateral(
    raw: bytes,
    sig: bytes,
    chain: Sequence[x509.Certificate],
    root: x509.Certificate,
    crl: x509.CertificateRevocationList,
    now: datetime,
    kind: str,
    what: str,
) -> None:
    """TCB info or QE identity: signed by an Intel TCB Signing certificate issued by ``root``, not revoked."""
    check_chain(list(chain), root, now, kind, TCB_SIGNING_SHAPE, f"{what} signing")
    _not_revoked(crl, chain[0], kind, f"{what} signing")
    verify_ecdsa(chain[0].public_key(), raw_ecdsa_to_der(sig), raw, "sha256", kind, what)


def verify_dcap_quote(
    quote: bytes,
    collateral: DcapCollateral | dict[str, Any] | str | bytes,
    root_ca_pem: bytes | str,
    now: datetime,
) -> DcapClaims:
    """Verify an SGX or TDX quote; ``root_ca_pem`` holds the trusted Intel SGX Root CA(s).

    The PCK chain may end in any of the trusted roots; the CRLs, TCB info and
    QE identity must then come from that same root.
    """
    parsed = parse_dcap_quote(quote)
    kind = "tdx" if parsed.is_tdx else "sgx"
    now = utc(now, kind)
    col = collateral if isinstance(collateral, DcapCollateral) else parse_collateral(collateral, kind)
    roots = load_pem_chain(root_ca_pem, kind, "trusted root CA")

    # PCK chain and revocation.
    chain = load_pem_chain(parsed.cert.pck_chain_pem, kind, "PCK certificate chain")
    if len(chain) < 2:
        raise VerificationError(f"{kind}: PCK certificate chain has no CA certificate")
    root = check_chain_to_any(chain, roots, now, kind, "PCK certificate", PCK_SHAPE)
    pck_cert, pck_ca = chain[0], chain[1]
    _check_crl(col.pck_crl, pck_ca, now, kind, "PCK CRL")
    _check_crl(col.root_ca_crl, root, now, kind, "root CA CRL")
    _not_revoked(col.pck_crl, pck_cert, kind, "PCK")
    _not_revoked(col.root_ca_crl, pck_ca, kind, "PCK CA")
    pck = parse_pck_extension(pck_cert, kind)

    # TCB info and QE identity: signed by Intel's TCB signing key, in date, for this platform.
    info, ident = col.tcb_info, col.qe_identity
    verify_signed_collateral(
        info.raw, col.tcb_info_signature, col.tcb_info_chain, root, col.root_ca_crl, now, kind, "TCB info"
    )
    _window(info.issue_date, info.next_update, now, kind, "TCB info")
    verify_signed_collateral(
        ident.raw, col.qe_identity_signature, col.qe_identity_chain, root, col.root_ca_crl, now, kind, "QE identity"
    )
    _window(ident.issue_date, ident.next_update, now, kind, "QE identity")
    if info.id != kind.upper():
        raise VerificationError(f"{kind}: TCB info is for {info.id}, not {kind.upper()}")
    if ident.id != ("TD_QE" if parsed.is_tdx else "QE"):
        raise VerificationError(f"{kind}: QE identity {ident.id} does not fit a {kind.upper()} quote")
    if info.fmspc != pck.fmspc:
        raise VerificationError(f"{kind}: TCB info FMSPC {info.fmspc.hex()} does not match the PCK's {pck.fmspc.hex()}")
    if info.pce_id != pck.pce_id:
        raise VerificationError(f"{kind}: TCB info PCE id does not match the PCK's")

    # The QE vouches for the attestation key; the PCK key vouches for the QE.
    pck_key = pck_cert.public_key()
    if not isinstance(pck_key, ec.EllipticCurvePublicKey) or pck_key.curve.name != "secp256r1":
        raise VerificationError(f"{kind}: PCK key is not ECDSA P-256")
    qe = parsed.cert.qe_report
    verify_ecdsa(pck_key, raw_ecdsa_to_der(parsed.cert.qe_report_signature), qe.raw, "sha256", kind, "QE report")
    binding = hashlib.sha256(parsed.attestation_key + parsed.cert.qe_auth_data).digest() + bytes(32)
    if not hmac.compare_digest(binding, qe.report_data):
        raise VerificationError(f"{kind}: QE report data does not bind the attestation key")
    att_key = p256_from_raw(parsed.attestation_key, kind, "attestation key")
    verify_ecdsa(att_key, raw_ecdsa_to_der(parsed.signature), parsed.signed_bytes, "sha256", kind, "quote")

    verdict = appraise(info, ident, pck, qe, parsed.body if isinstance(parsed.body, TdReport) else None, kind)
    return DcapClaims(
        tee=kind,
        quote=parsed,
        body=parsed.body,
        report_data=parsed.body.report_data,
        tcb_status=verdict.status,
        advisory_ids=verdict.advisory_ids,
        tcb_date=verdict.tcb_date,
        platform_status=verdict.platform_status,
        qe_status=verdict.qe_status,
        tdx_module_status=verdict.tdx_module_status,
        fmspc=pck.fmspc,
        pck=pck,
    )


def verify_sgx_quote(
    quote: bytes, collateral: DcapCollateral | dict[str, Any] | str | bytes, root_ca_pem: bytes | str, now: datetime
) -> DcapClaims:
    """As :func:`verify_dcap_quote`, refusing anything but an SGX quote."""
    claims = verify_dcap_quote(quote, collateral, root_ca_pem, now)
    if claims.tee != "sgx":
        raise VerificationError("sgx: quote is a TDX quote")
    return claims


def verify_tdx_quote(
    quote: bytes, collateral: DcapCollateral | dict[str, Any] | str | bytes, root_ca_pem: bytes | str, now: datetime
) -> DcapClaims:
    """As :func:`verify_dcap_quote`, refusing anything but a TDX quote."""
    claims = verify_dcap_quote(quote, collateral, root_ca_pem, now)
    if claims.tee != "tdx":
        raise VerificationError("tdx: quote is an SGX quote")
    return claims
