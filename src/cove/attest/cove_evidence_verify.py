"""Verify Cove evidence: the platform key's signature, and what vouches for that key.

The chain, TPM-rooted: the EK certificate chains to a trusted EK CA; the AK
certificate (issued after credential activation) chains to a trusted AK CA
and names that EK certificate and the AK; the AK signed a quote whose
qualifying data binds the platform key, runtime and epoch, and whose Cove
PCR equals a reset extended by the runtime and then the platform key hash;
the platform key signed the report. Self-certified evidence stops at the
platform key, and the claims say so; whether to accept it is policy.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cove.attest import evidence as ev
from cove.attest._keys import verify_ecdsa
from cove.attest._x509 import check_chain_to_any, der, load_der_cert, load_pem_chain, utc
from cove.attest.ak_ca import ak_binding, check_ak_attributes
from cove.attest.appraisal import Appraisal, jsonable
from cove.attest.errors import VerificationError
from cove.attest.tpm import TpmQuoteClaims, public_key, verify_tpm_quote
from cove.attest.tpm_structs import parse_public

CLOCK_SKEW = timedelta(seconds=60)


@dataclass(frozen=True)
class CoveClaims:
    """Verified Cove evidence."""

    report: ev.Report
    root: str
    platform_key: bytes  # SHA-256 of the PAK
    runtime: bytes
    epoch: bytes
    epoch_start: datetime
    quote: TpmQuoteClaims | None = None
    ek_certificate: bytes | None = None  # DER
    ek_root: bytes | None = None  # DER of the trusted EK CA it chains to
    ak_name: bytes | None = None


def load_platform_key(spki: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_der_public_key(spki)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise VerificationError("cove: platform key is not a valid public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise VerificationError("cove: platform key is not ECDSA P-256")
    return key


def verify_report_signature(e: ev.Evidence) -> bytes:
    """Check the platform key signed the report and the report names that key; its hash."""
    digest = ev.pak_hash(e.endorsement.pak)
    if not hmac.compare_digest(digest, e.report.platform_key):
        raise VerificationError("cove: report names another platform key than the endorsement's")
    if e.report.root != e.endorsement.root:
        raise VerificationError("cove: report and endorsement disagree on the platform root")
    if not hmac.compare_digest(e.report.endorsement, ev.endorsement_digest(e.endorsement_bytes)):
        raise VerificationError("cove: report was signed for another endorsement than the one it came with")
    key = load_platform_key(e.endorsement.pak)
    verify_ecdsa(key, e.signature, ev.REPORT_CONTEXT + e.report_bytes, "sha256", "cove", "report")
    return digest


def _verify_tpm(e: ev.Evidence, digest: bytes, ek_roots_pem, ak_roots_pem, now: datetime):
    t = e.endorsement.tpm
    if not ek_roots_pem or not ak_roots_pem:
        raise VerificationError("cove: TPM-rooted evidence needs trusted EK CA and AK CA certificates",
                                "name them in the policy: [cove] ek_ca and ak_ca")
    ek_chain = [load_der_cert(c, "cove", "EK chain certificate") for c in t.ek_chain]
    ek_root = check_chain_to_any(ek_chain, load_pem_chain(ek_roots_pem, "cove", "trusted EK CA"), now, "cove",
                                 "EK certificate")
    ak_chain = [load_der_cert(c, "cove", "AK chain certificate") for c in t.ak_chain]
    check_chain_to_any(ak_chain, load_pem_chain(ak_roots_pem, "cove", "trusted AK CA"), now, "cove",
                       "AK certificate")
    ak = parse_public(t.ak)
    check_ak_attributes(ak, "cove")
    name, ek_cert_hash = ak_binding(ak_chain[0])
    if not hmac.compare_digest(name, ak.name):
        raise VerificationError("cove: AK certificate is for another attestation key")
    if not hmac.compare_digest(ek_cert_hash, hashlib.sha256(der(ek_chain[0])).digest()):
        raise VerificationError("cove: AK certificate binds the AK to another TPM's EK")
    if ak_chain[0].public_key() != public_key(t.ak):
        raise VerificationError("cove: AK certificate key differs from the attestation key")
    qualifier = ev.quote_qualifier(e.endorsement.pak, e.endorsement.runtime, e.endorsement.epoch,
                                   e.endorsement.epoch_start_ms)
    try:
        quote = verify_tpm_quote(t.attest, t.signature, t.pcrs, t.ak, qualifier)
    except VerificationError as exc:
        raise VerificationError("cove: " + exc.message.removeprefix("tpm: "), exc.hint) from None
    value = quote.pcrs.get("sha256", {}).get(t.pcr)
    if value is None:
        raise VerificationError(f"cove: the quote does not cover Cove's PCR sha256:{t.pcr}")
    if not hmac.compare_digest(value, ev.platform_pcr_value(e.endorsement.runtime, digest)):
        raise VerificationError(f"cove: PCR sha256:{t.pcr} does not hold the runtime and platform key measurements",
                                "the PCR was extended by something else, or the quote is for another key")
    return quote, der(ek_chain[0]), der(ek_root), ak.name


def verify_cove_evidence(evidence: bytes, now: datetime, *, ek_roots: bytes | str | None = None,
                         ak_roots: bytes | str | None = None) -> CoveClaims:
    """Verify Cove evidence at time ``now``; ``ek_roots``/``ak_roots`` are trusted CA PEM bundles.

    They are needed only for TPM-rooted evidence. Freshness (nonce, age) and
    reference values are the policy's job (:mod:`cove.attest.policy`).
    """
    now = utc(now, "cove")
    e = ev.parse_evidence(evidence)
    digest = verify_report_signature(e)
    if e.report.timestamp + CLOCK_SKEW < e.endorsement.epoch_start:
        raise VerificationError("cove: report predates its platform epoch")
    if e.endorsement.root == "tpm":
        quote, ek_cert, ek_root, ak_name = _verify_tpm(e, digest, ek_roots, ak_roots, now)
        return CoveClaims(e.report, "tpm", digest, e.endorsement.runtime, e.endorsement.epoch,
                          e.endorsement.epoch_start, quote, ek_cert, ek_root, ak_name)
    return CoveClaims(e.report, "self-certified", digest, e.endorsement.runtime, e.endorsement.epoch,
                      e.endorsement.epoch_start)


def appraisal(claims: CoveClaims) -> Appraisal:
    """The policy's view of verified Cove evidence."""
    r = claims.report
    details = {
        "report": jsonable(r) | {"timestamp": jsonable(r.timestamp)},
        "platform": {"root": claims.root, "platform_key": claims.platform_key.hex(), "runtime": claims.runtime.hex(),
                     "epoch": claims.epoch.hex(), "epoch_start": jsonable(claims.epoch_start)},
    }
    if claims.quote is not None:
        details["platform"]["tpm"] = {
            "pcrs": jsonable(claims.quote.pcrs), "ak_name": claims.ak_name.hex(),
            "ek_certificate_sha256": hashlib.sha256(claims.ek_certificate).hexdigest(),
            "ek_root_sha256": hashlib.sha256(claims.ek_root).hexdigest(),
            "clock": claims.quote.clock_info.clock, "reset_count": claims.quote.clock_info.reset_count}
    return Appraisal(
        evidence_type="cove", measurement=r.measurement, signer=r.signer, product_id=r.product_id, svn=r.svn,
        debug=r.debug, backend=r.backend, isolation=r.isolation, report_data=r.report_data,
        issued_at=r.timestamp, platform_root=claims.root, platform_key=claims.platform_key,
        platform_issued_at=claims.epoch_start, runtime=claims.runtime,
        ek_certificate=hashlib.sha256(claims.ek_certificate).digest() if claims.ek_certificate else None,
        ak_name=claims.ak_name,
        pcrs=claims.quote.pcrs if claims.quote else {}, instance_id=r.instance_id, claims=details)
