"""Appraising tee-evidence: the verifier per tee type, and the report-data binding.

``runtime-data`` (the challenge's nonce and the TEE's public key) is hashed in
its canonical JSON form (keys sorted, no spaces, UTF-8): SHA-384 by default,
SHA-256 accepted. The evidence's report data must be that hash followed by
zero bytes; otherwise the evidence is bound to another nonce or another TEE
key and is refused (``EvidenceBinding``).

Each verifier turns evidence into flat claims (JSON values only) that
policies read: ``tee``, and where the type has them ``measurement``,
``signer``, ``product_id``, ``svn``, ``debug``, ``tcb_status`` and
type-specific fields. The formats of tee-evidence per type are in
docs/formats/kbs-evidence.md.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cove.errors import CoveError
from cove.kbs.problems import Problem

TEE_TYPES = ("cove", "tpm", "sgx", "tdx", "snp", "sample")
# Names other KBS clients use for the same TEEs.
TEE_ALIASES = {"intel-sgx": "sgx", "intel-tdx": "tdx", "amd-sev-snp": "snp"}
HASHES = ("sha384", "sha256")


def canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def runtime_data_hash(runtime_data: dict, algorithm: str = "sha384") -> bytes:
    return hashlib.new(algorithm, canonical_json(runtime_data)).digest()


def expected_report_data(runtime_data: dict, algorithm: str = "sha384", size: int = 64) -> bytes:
    """What a client binds into its evidence: the hash, zero-padded to the report data size."""
    digest = runtime_data_hash(runtime_data, algorithm)
    return digest + bytes(max(0, size - len(digest)))


def check_binding(report_data: bytes, runtime_data: dict) -> str:
    """The hash algorithm that binds runtime_data in report_data, or an EvidenceBinding problem."""
    for algorithm in HASHES:
        digest = runtime_data_hash(runtime_data, algorithm)
        if len(report_data) < len(digest):
            continue
        head, tail = report_data[:len(digest)], report_data[len(digest):]
        if hmac.compare_digest(head, digest) and not any(tail):
            return algorithm
    raise Problem("EvidenceBinding",
                  "the evidence's report data is not the hash of this runtime-data (nonce and tee-pubkey): "
                  "it was made for another challenge or another TEE key")


@dataclass
class TrustAnchors:
    """What the broker trusts to appraise hardware evidence; set by `cove kbs serve` options."""

    sgx_root_ca: bytes | None = None  # Intel SGX Root CA, PEM
    snp_ask_ark: list[bytes] = field(default_factory=list)  # AMD ASK+ARK bundles, PEM
    tpm_aks: list[bytes] = field(default_factory=list)  # trusted TPM attestation keys, PEM

    @classmethod
    def from_files(cls, sgx_root_ca: Path | None, snp_ask_ark: list[Path], tpm_aks: list[Path]) -> "TrustAnchors":
        def read(path: Path) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise CoveError(f"cannot read trust anchor {path}: {exc.strerror}") from None
        return cls(read(sgx_root_ca) if sgx_root_ca else None, [read(p) for p in snp_ask_ark],
                   [read(p) for p in tpm_aks])


@dataclass(frozen=True)
class Appraisal:
    """Claims from verified evidence, and the report data it carries."""

    claims: dict
    report_data: bytes


Verifier = Callable[[dict, TrustAnchors, dt.datetime], Appraisal]


def _b64(evidence: dict, name: str, tee: str) -> bytes:
    value = evidence.get(name)
    if not isinstance(value, str):
        raise Problem("EvidenceInvalid", f"{tee} evidence lacks {name!r} (base64)")
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_" if ("-" in value or "_" in value)
                                else None, validate=True)
    except (binascii.Error, ValueError):
        raise Problem("EvidenceInvalid", f"{tee} evidence {name!r} is not base64") from None


def _verified(tee: str, call):
    """Run a cove.attest verifier; its one error type becomes EvidenceInvalid."""
    from cove.attest.errors import VerificationError

    try:
        return call()
    except VerificationError as exc:
        raise Problem("EvidenceInvalid", exc.line()) from None
    except CoveError as exc:
        raise Problem("EvidenceInvalid", f"{tee}: {exc.line()}") from None


def appraise_sample(evidence: dict, anchors: TrustAnchors, now: dt.datetime) -> Appraisal:
    """Unsigned claims for protocol tests: proves nothing, and the default policy refuses it."""
    report_data = _b64(evidence, "report_data", "sample")
    claims: dict = {"tee": "sample", "self_certified": True}
    for name, kind in (("svn", int), ("debug", bool), ("product_id", int)):
        if name in evidence:
            if type(evidence[name]) is not kind:
                raise Problem("EvidenceInvalid", f"sample evidence {name!r} must be {kind.__name__}")
            claims[name] = evidence[name]
    for name in ("measurement", "signer"):
        if name in evidence:
            value = evidence[name]
            if not isinstance(value, str) or len(value) > 128:
                raise Problem("EvidenceInvalid", f"sample evidence {name!r} must be hex")
            claims[name] = value.lower()
    return Appraisal(claims, report_data)


def appraise_tpm(evidence: dict, anchors: TrustAnchors, now: dt.datetime) -> Appraisal:
    from cove.attest import verify_tpm_quote
    from cove.attest.errors import VerificationError

    attest = _b64(evidence, "quote", "tpm")
    signature = _b64(evidence, "signature", "tpm")
    pcrs = _b64(evidence, "pcrs", "tpm")
    if not anchors.tpm_aks:
        raise Problem("EvidenceInvalid", "tpm: this broker trusts no TPM attestation key (--trust-tpm-ak)")
    last: str = ""
    for ak in anchors.tpm_aks:
        try:
            quote = verify_tpm_quote(attest, signature, pcrs, ak, None)
        except VerificationError as exc:
            last = exc.line()
            continue
        pcr_claims = {alg: {str(i): v.hex() for i, v in sorted(bank.items())} for alg, bank in quote.pcrs.items()}
        claims = {"tee": "tpm", "pcrs": pcr_claims, "pcr_digest": quote.pcr_digest.hex(),
                  "firmware_version": quote.firmware_version, "tcb_status": "UpToDate"}
        return Appraisal(claims, quote.extra_data)
    raise Problem("EvidenceInvalid", last or "tpm: the quote did not verify")


def appraise_dcap(tee: str) -> Verifier:
    def verify(evidence: dict, anchors: TrustAnchors, now: dt.datetime) -> Appraisal:
        from cove.attest import verify_sgx_quote, verify_tdx_quote

        quote = _b64(evidence, "quote", tee)
        collateral = evidence.get("collateral")
        if not isinstance(collateral, dict):
            raise Problem("EvidenceInvalid", f"{tee} evidence lacks its PCS collateral ('collateral' object)")
        if anchors.sgx_root_ca is None:
            raise Problem("EvidenceInvalid", f"{tee}: this broker has no Intel SGX root CA (--sgx-root-ca)")
        fn = verify_sgx_quote if tee == "sgx" else verify_tdx_quote
        got = _verified(tee, lambda: fn(quote, collateral, anchors.sgx_root_ca, now))
        claims: dict = {"tee": tee, "tcb_status": got.tcb_status, "advisory_ids": list(got.advisory_ids),
                        "fmspc": got.fmspc.hex()}
        body = got.body
        if tee == "sgx":
            claims.update(measurement=body.mr_enclave.hex(), signer=body.mr_signer.hex(),
                          product_id=body.isv_prod_id, svn=body.isv_svn,
                          debug=bool(body.attributes_decoded.debug))
        else:
            claims.update(measurement=body.mr_td.hex(), mr_config_id=body.mr_config_id.hex(),
                          rtmrs=[r.hex() for r in body.rtmrs], debug=bool(body.td_attributes_decoded.debug))
        return Appraisal(claims, got.report_data)
    return verify


def appraise_snp(evidence: dict, anchors: TrustAnchors, now: dt.datetime) -> Appraisal:
    from cove.attest import verify_snp_report
    from cove.attest.errors import VerificationError

    report = _b64(evidence, "report", "snp")
    vcek = _b64(evidence, "vcek", "snp")
    if not anchors.snp_ask_ark:
        raise Problem("EvidenceInvalid", "snp: this broker trusts no AMD ASK/ARK chain (--snp-ask-ark)")
    last = ""
    for chain in anchors.snp_ask_ark:
        try:
            got = verify_snp_report(report, vcek, chain, now)
        except VerificationError as exc:
            last = exc.line()
            continue
        tcb = got.report.reported_tcb
        claims = {"tee": "snp", "measurement": got.measurement.hex(), "host_data": got.host_data.hex(),
                  "svn": got.report.guest_svn, "debug": bool(got.debug_allowed), "product": got.product,
                  "reported_tcb": {"bootloader": tcb.bootloader, "tee": tcb.tee, "snp": tcb.snp,
                                   "microcode": tcb.microcode},
                  "tcb_status": "UpToDate"}
        return Appraisal(claims, got.report_data)
    raise Problem("EvidenceInvalid", last or "snp: the report did not verify")


def appraise_cove(evidence: dict, anchors: TrustAnchors, now: dt.datetime) -> Appraisal:
    """Cove evidence (a platform-signed enclave report), verified by cove.attest."""
    try:
        from cove.attest import evidence as cove_evidence  # the attestation layer's cove format
    except ImportError:
        raise Problem("EvidenceInvalid", "cove: this installation has no verifier for Cove evidence yet") from None
    raw = _b64(evidence, "evidence", "cove")
    result = _verified("cove", lambda: cove_evidence.verify(raw, now=now))
    claims = dict(result.claims) if hasattr(result, "claims") else dict(result)
    claims["tee"] = "cove"
    report_data = claims.pop("report_data", b"")
    if isinstance(report_data, str):
        report_data = bytes.fromhex(report_data)
    return Appraisal(_jsonable(claims), bytes(report_data))


def _jsonable(value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


VERIFIERS: dict[str, Verifier] = {
    "sample": appraise_sample,
    "tpm": appraise_tpm,
    "sgx": appraise_dcap("sgx"),
    "tdx": appraise_dcap("tdx"),
    "snp": appraise_snp,
    "cove": appraise_cove,
}


def normalize_tee(tee) -> str:
    if not isinstance(tee, str):
        raise Problem("UnknownTee", "the request names no tee")
    name = TEE_ALIASES.get(tee, tee)
    if name not in VERIFIERS:
        raise Problem("UnknownTee", f"tee {tee!r} is not one of {', '.join(TEE_TYPES)}")
    return name


def appraise(tee: str, evidence, runtime_data: dict, anchors: TrustAnchors, now: dt.datetime) -> dict:
    """Verify evidence of type tee and its binding to runtime_data; the claims, or a problem."""
    if isinstance(evidence, str):  # some clients send the evidence as a JSON string
        try:
            evidence = json.loads(evidence)
        except ValueError:
            raise Problem("EvidenceInvalid", f"{tee} tee-evidence is a string but not JSON") from None
    if isinstance(evidence, dict) and isinstance(evidence.get("primary_evidence"), (dict, str)) \
            and len(evidence) <= 2 and set(evidence) <= {"primary_evidence", "additional_evidence"}:
        evidence = evidence["primary_evidence"]  # the composite form of newer KBS clients
        if isinstance(evidence, str):
            try:
                evidence = json.loads(evidence)
            except ValueError:
                raise Problem("EvidenceInvalid", f"{tee} primary_evidence is a string but not JSON") from None
    if not isinstance(evidence, dict):
        raise Problem("EvidenceInvalid", f"{tee} tee-evidence must be a JSON object")
    appraisal = VERIFIERS[tee](evidence, anchors, now)
    algorithm = check_binding(appraisal.report_data, runtime_data)
    claims = dict(appraisal.claims)
    claims["report_data_hash"] = algorithm
    return claims
