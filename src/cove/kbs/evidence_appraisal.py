"""Appraising tee-evidence: the verifier per tee type, and the report-data binding.

``runtime-data`` (the challenge's nonce and the TEE's public key), with the
attestation's ``additional-evidence`` string, is hashed in its RFC 8785
canonical JSON form as the Confidential Containers client does
(:mod:`cove.kbs.coco_binding`): SHA-384 by default, SHA-512 and SHA-256
accepted. The evidence's report data must be that hash followed by zero
bytes; otherwise the evidence is bound to another nonce or another TEE key
and is refused (``EvidenceBinding``).

Evidence is verified by :func:`cove.attest.verifier.verify`, the dispatcher
``cove verify`` and RA-TLS use, with the same trust anchors in the same
order, so the broker and the command line give one verdict on one piece of
evidence; this module only unpacks tee-evidence, checks the binding and maps
failures to problems. Claims are normalized by :mod:`cove.attest.appraisal`,
so release policies read measurement, signer, svn, debug, TCB status the same
way for every type. The formats of tee-evidence per type are in
docs/formats/kbs-evidence.md.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cove.attest import appraisal as attest_mod
from cove.attest import verifier
from cove.attest.appraisal import Appraisal
from cove.attest.policy import Policy
from cove.decode import decode_json
from cove.errors import CoveError
from cove.kbs import coco_binding
from cove.kbs.problems import Problem

TEE_TYPES = attest_mod.EVIDENCE_TYPES  # cove, tpm, sgx, tdx, snp, sample
# Names other KBS clients use for the same TEEs.
TEE_ALIASES = {"intel-sgx": "sgx", "intel-tdx": "tdx", "amd-sev-snp": "snp"}
HASHES = coco_binding.SELECTABLE  # the broker selects one in the challenge; each binds as well


def canonical_json(value: object) -> bytes:
    """RFC 8785 canonical JSON, what the Confidential Containers client hashes."""
    return coco_binding.canonical(value)


def runtime_data_hash(runtime_data: dict[str, Any], algorithm: str = "sha384") -> bytes:
    return hashlib.new(algorithm, canonical_json(runtime_data)).digest()


def expected_report_data(
    runtime_data: dict[str, Any], algorithm: str = "sha384", size: int = 64, additional_evidence: str = ""
) -> bytes:
    """What a client binds into its evidence: the hash of runtime_data with its additional-evidence
    (cove.kbs.coco_binding), zero-padded to the report data size."""
    digest = runtime_data_hash(coco_binding.primary_runtime_data(runtime_data, additional_evidence), algorithm)
    return digest + bytes(max(0, size - len(digest)))


def check_binding(report_data: bytes, runtime_data: dict[str, Any]) -> str:
    """The hash algorithm that binds runtime_data in report_data, or an EvidenceBinding problem.

    The canonical JSON is made once and hashed with each algorithm in turn (it was made anew for
    each: a client binding with SHA-256, the last tried, paid for three)."""
    canonical = canonical_json(runtime_data)
    for algorithm in HASHES:
        digest = hashlib.new(algorithm, canonical).digest()
        if len(report_data) < len(digest):
            continue
        head, tail = report_data[: len(digest)], report_data[len(digest) :]
        if hmac.compare_digest(head, digest) and not any(tail):
            return algorithm
    raise Problem(
        "EvidenceBinding",
        "the evidence's report data is not the hash of this runtime-data (nonce and tee-pubkey): "
        "it was made for another challenge or another TEE key",
    )


@dataclass
class TrustAnchors:
    """What the broker trusts to appraise hardware evidence; set by `cove kbs serve` options.

    The options replace, per evidence type, the roots its attestation policy
    names (``[sgx] roots``, ``[tdx] roots``, ``[snp] roots``, ``[cove]
    ek_ca``/``ak_ca``), which replace the vendors' published roots: the order
    of :mod:`cove.attest.verifier`, which verifies every type for the broker.
    """

    sgx_root_ca: bytes | None = None  # Intel SGX Root CA, PEM (sgx and tdx)
    snp_ask_ark: list[bytes] = field(default_factory=list)  # AMD ASK/ASVK+ARK bundles, PEM
    tpm_aks: list[bytes] = field(default_factory=list)  # trusted TPM attestation keys, PEM
    cove_ek_roots: bytes | None = None  # TPM EK CA bundle for TPM-rooted cove evidence, PEM
    cove_ak_roots: bytes | None = None  # AK CA bundle (cove platform's AK certifier), PEM
    policy: Policy | None = None  # the attestation policy whose roots come next

    @classmethod
    def from_files(
        cls,
        sgx_root_ca: Path | None,
        snp_ask_ark: list[Path],
        tpm_aks: list[Path],
        cove_ek_roots: Path | None = None,
        cove_ak_roots: Path | None = None,
    ) -> TrustAnchors:
        def read(path: Path) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise CoveError(f"cannot read trust anchor {path}: {exc.strerror}") from None

        return cls(
            read(sgx_root_ca) if sgx_root_ca else None,
            [read(p) for p in snp_ask_ark],
            [read(p) for p in tpm_aks],
            read(cove_ek_roots) if cove_ek_roots else None,
            read(cove_ak_roots) if cove_ak_roots else None,
        )

    def with_policy_roots(self, policy: Policy) -> TrustAnchors:
        """These options, then ``policy``'s roots per type (each type keeps its own)."""
        return replace(self, policy=policy)

    def for_verifier(self) -> verifier.TrustAnchors:
        intel = (self.sgx_root_ca,) if self.sgx_root_ca else ()
        return verifier.TrustAnchors(
            sgx_roots=intel,
            tdx_roots=intel,
            snp_chains=tuple(self.snp_ask_ark),
            tpm_aks=tuple(self.tpm_aks),
            cove_ek_roots=self.cove_ek_roots,
            cove_ak_roots=self.cove_ak_roots,
        )


def _b64_optional(evidence: dict[str, Any], name: str, tee: str) -> bytes | None:
    return None if evidence.get(name) is None else _b64(evidence, name, tee)


def _b64(evidence: dict[str, Any], name: str, tee: str) -> bytes:
    value = evidence.get(name)
    if not isinstance(value, str):
        raise Problem("EvidenceInvalid", f"{tee} evidence lacks {name!r} (base64)")
    try:
        if "-" in value or "_" in value:
            return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        return base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise Problem("EvidenceInvalid", f"{tee} evidence {name!r} is not base64") from None


def _hex_claim(evidence: dict[str, Any], name: str) -> bytes | None:
    value = evidence.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 128 or len(value) % 2:
        raise Problem("EvidenceInvalid", f"sample evidence {name!r} must be hex")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise Problem("EvidenceInvalid", f"sample evidence {name!r} must be hex") from None


def appraise_sample(evidence: dict[str, Any]) -> Appraisal:
    """Unsigned claims for protocol tests: proves nothing, and the default policy refuses it."""
    report_data = _b64(evidence, "report_data", "sample")
    values: dict[str, Any] = {}
    for name, kind in (("svn", int), ("debug", bool), ("product_id", int)):
        if name in evidence:
            if type(evidence[name]) is not kind or (kind is int and not 0 <= evidence[name] < 1 << 63):
                raise Problem("EvidenceInvalid", f"sample evidence {name!r} must be {kind.__name__}")
            values[name] = evidence[name]
    return Appraisal(
        evidence_type="sample",
        measurement=_hex_claim(evidence, "measurement"),
        signer=_hex_claim(evidence, "signer"),
        report_data=report_data,
        backend="sample",
        isolation="none (sample evidence proves nothing)",
        **values,
    )


def evidence_inputs(tee: str, evidence: dict[str, Any]) -> tuple[bytes, verifier.Inputs]:
    """The raw evidence and its side inputs from one tee-evidence object (docs/formats/kbs-evidence.md)."""
    if tee == "tpm":
        return _b64(evidence, "quote", tee), verifier.Inputs(
            tpm_signature=_b64(evidence, "signature", tee),
            tpm_pcrs=_b64(evidence, "pcrs", tee),
            event_log=_b64_optional(evidence, "event_log", tee),
        )
    if tee in ("sgx", "tdx"):
        quote = _b64(evidence, "quote", tee)
        collateral = evidence.get("collateral")
        if not isinstance(collateral, dict):
            raise Problem("EvidenceInvalid", f"{tee} evidence lacks its PCS collateral ('collateral' object)")
        return quote, verifier.Inputs(collateral=collateral)
    if tee == "snp":
        return _b64(evidence, "report", tee), verifier.Inputs(vcek=_b64(evidence, "vcek", tee))
    return _b64(evidence, "evidence", tee), verifier.Inputs()


def verify(tee: str, evidence: dict[str, Any], anchors: TrustAnchors, now: dt.datetime) -> Appraisal:
    """Verify one tee-evidence object with :func:`cove.attest.verifier.verify`; EvidenceInvalid if it fails."""
    if tee == "sample":
        return appraise_sample(evidence)
    raw, inputs = evidence_inputs(tee, evidence)
    try:
        return verifier.verify(
            raw, kind=tee, policy=anchors.policy, now=now, inputs=inputs, anchors=anchors.for_verifier()
        )
    except CoveError as exc:
        line = exc.line()
        raise Problem("EvidenceInvalid", line if line.startswith(tee) else f"{tee}: {line}") from None


VERIFIERS = frozenset(TEE_TYPES)


def normalize_tee(tee: object) -> str:
    if not isinstance(tee, str):
        raise Problem("UnknownTee", "the request names no tee")
    name = TEE_ALIASES.get(tee, tee)
    if name not in VERIFIERS:
        raise Problem("UnknownTee", f"tee {tee!r} is not one of {', '.join(TEE_TYPES)}")
    return name


def _invalid_evidence(message: str) -> Problem:
    return Problem("EvidenceInvalid", message)


def appraise(
    tee: str, evidence: object, runtime_data: dict[str, Any], anchors: TrustAnchors, now: dt.datetime
) -> Appraisal:
    """Verify evidence of type tee and its binding to runtime_data; the appraisal, or a problem."""
    if isinstance(evidence, str):  # some clients send the evidence as a JSON string
        evidence = decode_json(evidence, _invalid_evidence, f"{tee} tee-evidence (a string)")
    if isinstance(evidence, dict) and set(evidence) and set(evidence) <= {"primary_evidence", "additional_evidence"}:
        evidence = evidence.get("primary_evidence")  # the composite form of newer KBS clients
        if isinstance(evidence, str):
            evidence = decode_json(evidence, _invalid_evidence, f"{tee} primary_evidence (a string)")
    if not isinstance(evidence, dict):
        raise Problem("EvidenceInvalid", f"{tee} tee-evidence must be a JSON object")
    result = verify(tee, evidence, anchors, now)
    check_binding(result.report_data or b"", runtime_data)
    return result


# -- claims as JSON (sessions, tokens) and back -------------------------------------------------------
_BYTES = ("measurement", "signer", "report_data", "platform_key", "runtime", "ek_certificate", "ak_name", "init_data")
_TIMES = ("issued_at", "platform_issued_at")


def to_claims(appraisal: Appraisal) -> dict[str, Any]:
    """The appraisal as JSON (what sessions store and tokens carry)."""
    claims = attest_mod.summary(appraisal)
    claims["tee"] = appraisal.evidence_type
    return claims


def from_claims(claims: dict[str, Any]) -> Appraisal:
    """The appraisal back from :func:`to_claims` (claims this broker stored or signed)."""
    values: dict[str, Any] = {}
    for name in Appraisal.__dataclass_fields__:
        if name not in claims or name == "claims":
            continue
        value = claims[name]
        if name in _BYTES:
            value = bytes.fromhex(value)
        elif name in _TIMES:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        elif name == "pcrs":
            value = {bank: {int(i): bytes.fromhex(v) for i, v in values_.items()} for bank, values_ in value.items()}
        elif name == "rtmrs":
            value = tuple(bytes.fromhex(v) for v in value)
        values[name] = value
    return Appraisal(**values)
