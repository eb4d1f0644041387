"""Verify Cove evidence: the platform key's signature, and what vouches for that key.

The chain, TPM-rooted: the EK certificate chains to a trusted EK CA; the AK
certificate (issued after credential activation) chains to a trusted AK CA
and names that EK certificate and the AK; the AK signed a quote whose
qualifying data binds the platform key, runtime and epoch, and whose Cove
PCR equals a reset extended by the runtime and then the platform key hash;
the platform key signed the report. Self-certified evidence stops at the
platform key, and the claims say so; whether to accept it is policy.

Evidence from a `vm` enclave must also carry its vTPM's quote: the platform
key certified that vTPM's EK and AK and the launch measurement extended into
its launch PCR; the AK quoted that PCR with qualifying data bound to this
very report. A `vm` report without it is refused, so it cannot be stripped.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

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
    launch: bytes | None = None  # vm: the launch measurement the vTPM quoted
    vtpm: TpmQuoteClaims | None = None
    vtpm_ak_name: bytes | None = None
    vtpm_ek_name: bytes | None = None


@functools.lru_cache(maxsize=64)
def load_platform_key(spki: bytes) -> ec.EllipticCurvePublicKey:
    """The platform's public key from its SubjectPublicKeyInfo; cached per process by those bytes (a
    verifier sees the same few platforms again and again; the parse was 2 % of a key broker's flow).
    A key that does not load raises every time: errors are not cached."""
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


def _verify_tpm(
    e: ev.Evidence, digest: bytes, ek_roots_pem: bytes | str | None, ak_roots_pem: bytes | str | None, now: datetime
) -> tuple[TpmQuoteClaims, bytes, bytes, bytes]:
    t = e.endorsement.tpm
    if t is None:  # the parser refuses a TPM root without it
        raise VerificationError("cove: a TPM-rooted endorsement without its TPM quote")
    if not ek_roots_pem or not ak_roots_pem:
        raise VerificationError(
            "cove: TPM-rooted evidence needs trusted EK CA and AK CA certificates",
            "name them in the policy: [cove] ek_ca and ak_ca",
        )
    ek_chain = [load_der_cert(c, "cove", "EK chain certificate") for c in t.ek_chain]
    ek_root = check_chain_to_any(
        ek_chain, load_pem_chain(ek_roots_pem, "cove", "trusted EK CA"), now, "cove", "EK certificate"
    )
    ak_chain = [load_der_cert(c, "cove", "AK chain certificate") for c in t.ak_chain]
    check_chain_to_any(ak_chain, load_pem_chain(ak_roots_pem, "cove", "trusted AK CA"), now, "cove", "AK certificate")
    ak = parse_public(t.ak)
    check_ak_attributes(ak, "cove")
    name, ek_cert_hash = ak_binding(ak_chain[0])
    if not hmac.compare_digest(name, ak.name):
        raise VerificationError("cove: AK certificate is for another attestation key")
    if not hmac.compare_digest(ek_cert_hash, hashlib.sha256(der(ek_chain[0])).digest()):
        raise VerificationError("cove: AK certificate binds the AK to another TPM's EK")
    if ak_chain[0].public_key() != public_key(t.ak):
        raise VerificationError("cove: AK certificate key differs from the attestation key")
    qualifier = ev.quote_qualifier(
        e.endorsement.pak, e.endorsement.runtime, e.endorsement.epoch, e.endorsement.epoch_start_ms
    )
    try:
        quote = verify_tpm_quote(t.attest, t.signature, t.pcrs, t.ak, qualifier)
    except VerificationError as exc:
        raise VerificationError("cove: " + exc.message.removeprefix("tpm: "), exc.hint) from None
    value = quote.pcrs.get("sha256", {}).get(t.pcr)
    if value is None:
        raise VerificationError(f"cove: the quote does not cover Cove's PCR sha256:{t.pcr}")
    if not hmac.compare_digest(value, ev.platform_pcr_value(e.endorsement.runtime, digest)):
        raise VerificationError(
            f"cove: PCR sha256:{t.pcr} does not hold the runtime and platform key measurements",
            "the PCR was extended by something else, or the quote is for another key",
        )
    return quote, der(ek_chain[0]), der(ek_root), ak.name


def verify_vtpm(e: ev.Evidence) -> tuple[TpmQuoteClaims, bytes, bytes]:
    """Check a vm report's vTPM quote; (quote, AK name, EK name). The launch is in e.vtpm.statement."""
    v = e.vtpm
    if e.report.backend != "vm":
        raise VerificationError(f"cove: a {e.report.backend[:32]} report carries a vTPM quote")
    if v is None:
        raise VerificationError("cove: a vm report without its vTPM quote", "the evidence was truncated or altered")
    key = load_platform_key(e.endorsement.pak)
    verify_ecdsa(key, v.statement_signature, ev.VTPM_CONTEXT + v.statement_bytes, "sha256", "cove", "vTPM statement")
    if v.statement.instance_id != e.report.instance_id:
        raise VerificationError(
            "cove: the vTPM statement was certified for another run than the report's",
            "a vTPM quote goes only with the reports of the VM it belongs to",
        )
    ak = parse_public(v.statement.ak)
    check_ak_attributes(ak, "cove")
    ek = parse_public(v.statement.ek)
    try:
        quote = verify_tpm_quote(v.attest, v.signature, v.pcrs, ak, ev.vm_quote_qualifier(e.report_bytes))
    except VerificationError as exc:
        raise VerificationError("cove: vTPM " + exc.message.removeprefix("tpm: "), exc.hint) from None
    value = quote.pcrs.get("sha256", {}).get(v.statement.pcr)
    if value is None:
        raise VerificationError(f"cove: the vTPM quote does not cover the launch PCR sha256:{v.statement.pcr}")
    if not hmac.compare_digest(value, ev.launch_pcr_value(v.statement.launch)):
        raise VerificationError(
            f"cove: vTPM PCR sha256:{v.statement.pcr} does not hold the certified launch measurement",
            "the vTPM was extended by something else",
        )
    return quote, ak.name, ek.name


def verify_cove_evidence(
    evidence: bytes, now: datetime, *, ek_roots: bytes | str | None = None, ak_roots: bytes | str | None = None
) -> CoveClaims:
    """Verify Cove evidence at time ``now``; ``ek_roots``/``ak_roots`` are trusted CA PEM bundles.

    They are needed only for TPM-rooted evidence. Freshness (nonce, age) and
    reference values are the policy's job (:mod:`cove.attest.policy`).
    """
    now = utc(now, "cove")
    e = ev.parse_evidence(evidence)
    digest = verify_report_signature(e)
    if e.report.timestamp + CLOCK_SKEW < e.endorsement.epoch_start:
        raise VerificationError("cove: report predates its platform epoch")
    vm: dict[str, Any] = {}
    if e.report.backend == "vm" or e.vtpm is not None:
        vtpm, vtpm_ak, vtpm_ek = verify_vtpm(e)
        assert e.vtpm is not None  # verify_vtpm refuses a vm report without it
        vm = {"launch": e.vtpm.statement.launch, "vtpm": vtpm, "vtpm_ak_name": vtpm_ak, "vtpm_ek_name": vtpm_ek}
    if e.endorsement.root == "tpm":
        quote, ek_cert, ek_root, ak_name = _verify_tpm(e, digest, ek_roots, ak_roots, now)
        return CoveClaims(
            e.report,
            "tpm",
            digest,
            e.endorsement.runtime,
            e.endorsement.epoch,
            e.endorsement.epoch_start,
            quote,
            ek_cert,
            ek_root,
            ak_name,
            **vm,
        )
    return CoveClaims(
        e.report, "self-certified", digest, e.endorsement.runtime, e.endorsement.epoch, e.endorsement.epoch_start, **vm
    )


def appraisal(claims: CoveClaims) -> Appraisal:
    """The policy's view of verified Cove evidence."""
    r = claims.report
    details = {
        "report": jsonable(r) | {"timestamp": jsonable(r.timestamp)},
        "platform": {
            "root": claims.root,
            "platform_key": claims.platform_key.hex(),
            "runtime": claims.runtime.hex(),
            "epoch": claims.epoch.hex(),
            "epoch_start": jsonable(claims.epoch_start),
        },
    }
    if (
        claims.quote is not None
        and claims.ak_name is not None
        and claims.ek_certificate is not None
        and claims.ek_root is not None
    ):  # all four, or none: a TPM root
        details["platform"]["tpm"] = {
            "pcrs": jsonable(claims.quote.pcrs),
            "ak_name": claims.ak_name.hex(),
            "ek_certificate_sha256": hashlib.sha256(claims.ek_certificate).hexdigest(),
            "ek_root_sha256": hashlib.sha256(claims.ek_root).hexdigest(),
            "clock": claims.quote.clock_info.clock,
            "reset_count": claims.quote.clock_info.reset_count,
        }
    if claims.vtpm is not None:
        details["vtpm"] = {
            "launch": jsonable(claims.launch),
            "pcrs": jsonable(claims.vtpm.pcrs),
            "ak_name": jsonable(claims.vtpm_ak_name),
            "ek_name": jsonable(claims.vtpm_ek_name),
        }
    return Appraisal(
        evidence_type="cove",
        measurement=r.measurement,
        signer=r.signer,
        product_id=r.product_id,
        svn=r.svn,
        debug=r.debug,
        backend=r.backend,
        isolation=r.isolation,
        report_data=r.report_data,
        issued_at=r.timestamp,
        platform_root=claims.root,
        platform_key=claims.platform_key,
        platform_issued_at=claims.epoch_start,
        runtime=claims.runtime,
        ek_certificate=hashlib.sha256(claims.ek_certificate).digest() if claims.ek_certificate else None,
        ak_name=claims.ak_name,
        launch_measurement=claims.launch,
        pcrs=claims.quote.pcrs if claims.quote else {},
        instance_id=r.instance_id,
        claims=details,
    )
