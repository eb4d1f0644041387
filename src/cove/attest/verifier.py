"""One entry point for every evidence type: detect, verify, normalize, appraise.

:func:`verify` picks the type (or takes it), verifies the evidence with the
right verifier and trust anchors (the policy's, else the vendors' published
roots), and returns normalized claims; :func:`appraise` also evaluates a
policy. The command line, RA-TLS and the key broker all go through here, so
one piece of evidence gets one verdict whoever asks.

Trust anchors come, per evidence type, from the first that has any:
:class:`TrustAnchors` the caller configured (``cove verify --ask-ark``/``--ak``,
``cove kbs serve --sgx-root-ca``/``--snp-ask-ark``/``--tpm-ak``), then the
policy's roots for that type (``[sgx] roots``, ``[tdx] roots``, ``[snp] roots``,
``[cove] ek_ca``/``ak_ca``), then the vendors' published roots
(:mod:`cove.attest.roots`). A TPM quote has no vendor root: it needs a trusted AK.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from collections.abc import Callable
from typing import Any

from cove.attest import appraisal as ap
from cove.attest import roots
from cove.attest.appraisal import Appraisal
from cove.attest.errors import VerificationError
from cove.attest.policy import Policy, PolicyResult, Rules, default_policy, evaluate

TYPES = ("cove", "tpm", "sgx", "tdx", "snp")


@dataclass(frozen=True)
class Inputs:
    """What some evidence types need besides the evidence itself."""

    collateral: bytes | dict[str, Any] | None = None  # sgx/tdx: PCS collateral JSON
    vcek: bytes | None = None  # snp: VCEK or VLEK certificate (DER or PEM)
    ask_ark: bytes | None = None  # snp: AMD bundle, PEM: ASK/ASVK + ARK (a trust anchor: only from a trusted store)
    tpm_signature: bytes | None = None  # tpm: TPMT_SIGNATURE
    tpm_pcrs: bytes | None = None  # tpm: tpm2_quote -o file
    ak: bytes | None = None  # tpm: the trusted AK (PEM, DER or TPM2B_PUBLIC)
    event_log: bytes | None = None  # tpm: a TCG2 event log to replay
    fetch: Callable[[str, bytes], dict[str, Any]] | None = None  # missing collateral: (type, evidence) -> Inputs fields
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrustAnchors:
    """Roots an operator configured; each replaces the policy's and the vendors' for its type."""

    sgx_roots: tuple[bytes, ...] = ()  # Intel SGX Root CA certificates, PEM
    tdx_roots: tuple[bytes, ...] = ()  # the same for TDX quotes
    snp_chains: tuple[bytes, ...] = ()  # AMD bundles, PEM: ASK and/or ASVK, and ARK
    tpm_aks: tuple[bytes, ...] = ()  # trusted TPM attestation keys (PEM, DER or TPM2B_PUBLIC)
    cove_ek_roots: bytes | None = None  # TPM EK CA bundle, PEM
    cove_ak_roots: bytes | None = None  # AK certifier CA bundle, PEM


@dataclass(frozen=True)
class Verdict:
    appraisal: Appraisal
    result: PolicyResult

    @property
    def accepted(self) -> bool:
        return self.result.accepted


def detect(evidence: bytes) -> str:
    """The evidence type from its first bytes (Cove CBOR, DCAP quote, SNP report, TPMS_ATTEST)."""
    from cove.attest.evidence import looks_like_cove

    data = bytes(evidence)
    if data[:1] in (b"\xa5", b"\xa6", b"\xb9", b"\xbf") and looks_like_cove(data):  # a6: with a vTPM quote
        return "cove"
    if data[:4] == b"\xff\x54\x43\x47":
        return "tpm"
    # An SNP report's version is a u32 (its bytes 2-3 are zero); a DCAP quote has its key type there.
    # A v3 SNP report with guest_svn 0 would otherwise look like an SGX quote header.
    if len(data) == 1184 and 2 <= int.from_bytes(data[0:4], "little") <= 5:
        return "snp"
    if len(data) >= 8:
        version = int.from_bytes(data[0:2], "little")
        tee = int.from_bytes(data[4:8], "little")
        if version in (3, 4, 5) and tee in (0, 0x81) and len(data) > 436:
            return "tdx" if tee == 0x81 else "sgx"
    raise VerificationError(
        "evidence type not recognized (not Cove evidence, a DCAP quote, an SNP report or a TPM quote)",
        "name it with --type",
    )


def _dcap(kind: str, evidence: bytes, rules: Rules, inputs: Inputs, anchors: TrustAnchors, now: datetime) -> Appraisal:
    from cove.attest.dcap import verify_sgx_quote, verify_tdx_quote

    if inputs.collateral is None:
        raise VerificationError(f"{kind}: no collateral given", "pass --collateral FILE or --pccs URL")
    configured = anchors.sgx_roots if kind == "sgx" else anchors.tdx_roots
    if configured:
        root = b"\n".join(bytes(r).strip() + b"\n" for r in configured)
    else:
        root = rules.pem("roots") if rules.roots else roots.INTEL_SGX_ROOT_CA
    fn = verify_sgx_quote if kind == "sgx" else verify_tdx_quote
    return ap.from_dcap(fn(evidence, inputs.collateral, root, now))


def _snp(evidence: bytes, rules: Rules, inputs: Inputs, anchors: TrustAnchors, now: datetime) -> Appraisal:
    from cove.attest.snp import verify_snp_report

    if inputs.vcek is None:
        raise VerificationError("snp: no VCEK/VLEK certificate given", "pass --vcek FILE or --kds URL")
    vcek = inputs.vcek
    if vcek.lstrip().startswith(b"-----BEGIN"):
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        try:
            vcek = x509.load_pem_x509_certificate(vcek).public_bytes(serialization.Encoding.DER)
        except ValueError:
            raise VerificationError("snp: the VCEK file is not a certificate") from None
    if anchors.snp_chains or inputs.ask_ark is not None:
        chains = list(anchors.snp_chains) + ([inputs.ask_ark] if inputs.ask_ark is not None else [])
    elif rules.roots:
        chains = [rules.pem("roots")]
    else:
        chains = _amd_chains_for(vcek)
    error: VerificationError | None = None
    for chain in chains:
        try:
            return ap.from_snp(verify_snp_report(evidence, vcek, chain, now))
        except VerificationError as exc:
            error = exc
    assert error is not None  # there is always a chain: the bundled ones at least
    raise error


def _amd_chains_for(vcek_der: bytes) -> list[bytes]:
    """The bundled ASK/ARK chain of the VCEK's product (by its issuer), else all of them."""
    from cove.attest._x509 import load_der_cert

    try:
        issuer = load_der_cert(vcek_der, "snp", "VCEK").issuer.rfc4514_string()
    except VerificationError:
        return list(roots.AMD_ASK_ARK.values())
    for product, chain in roots.AMD_ASK_ARK.items():
        if product in issuer:
            return [chain]
    return list(roots.AMD_ASK_ARK.values())


def _tpm(evidence: bytes, rules: Rules, inputs: Inputs, anchors: TrustAnchors, nonce: bytes | None) -> Appraisal:
    from cove.attest.tpm import verify_tpm_quote

    if inputs.tpm_signature is None or inputs.tpm_pcrs is None:
        raise VerificationError(
            "tpm: a quote needs its signature and PCR values", "pass --tpm-sig FILE --tpm-pcrs FILE"
        )
    aks = list(anchors.tpm_aks) + ([inputs.ak] if inputs.ak is not None else [])
    if not aks:
        raise VerificationError(
            "tpm: no trusted attestation key (a TPM quote has no vendor root)",
            "pass --ak FILE (cove kbs serve: --tpm-ak FILE)",
        )
    check = None
    if inputs.event_log is not None:
        from cove.attest.eventlog import event_log_check

        check = event_log_check(inputs.event_log)
    error: VerificationError | None = None
    for ak in aks:
        try:
            return ap.from_tpm(
                verify_tpm_quote(evidence, inputs.tpm_signature, inputs.tpm_pcrs, ak, nonce, event_log_check=check)
            )
        except VerificationError as exc:
            error = exc
    assert error is not None  # aks is not empty
    raise error


def _cove(evidence: bytes, rules: Rules, inputs: Inputs, anchors: TrustAnchors, now: datetime) -> Appraisal:
    from cove.attest.cove_evidence_verify import appraisal, verify_cove_evidence

    claims = verify_cove_evidence(
        evidence,
        now,
        ek_roots=anchors.cove_ek_roots or rules.pem("ek_ca") or None,
        ak_roots=anchors.cove_ak_roots or rules.pem("ak_ca") or None,
    )
    return appraisal(claims)


def verify(
    evidence: bytes,
    *,
    kind: str = "auto",
    policy: Policy | None = None,
    now: datetime | None = None,
    inputs: Inputs = Inputs(),
    anchors: TrustAnchors = TrustAnchors(),
    nonce: bytes | None = None,
) -> Appraisal:
    """Verify evidence; raises VerificationError naming the failed check.

    ``nonce``: a TPM quote's extraData must equal it (a signed field of the
    evidence, so a mismatch is invalid evidence, not a policy refusal).
    """
    if not isinstance(evidence, (bytes, bytearray, memoryview)):
        raise VerificationError(f"evidence must be bytes, got {type(evidence).__name__}")
    evidence = bytes(evidence)
    if not evidence:
        raise VerificationError("the evidence is empty")
    kind = detect(evidence) if kind == "auto" else kind
    if kind not in TYPES:
        raise VerificationError(f"unknown evidence type {kind!r}", f"use one of: auto, {', '.join(TYPES)}")
    now = now or datetime.now(timezone.utc)
    policy = policy or default_policy()
    rules = policy.rules_for(kind)
    if inputs.fetch is not None:
        missing = (kind in ("sgx", "tdx") and inputs.collateral is None) or (kind == "snp" and inputs.vcek is None)
        if missing:
            from dataclasses import replace

            inputs = replace(inputs, **inputs.fetch(kind, evidence))
    if kind in ("sgx", "tdx"):
        return _dcap(kind, evidence, rules, inputs, anchors, now)
    if kind == "snp":
        return _snp(evidence, rules, inputs, anchors, now)
    if kind == "tpm":
        return _tpm(evidence, rules, inputs, anchors, nonce)
    return _cove(evidence, rules, inputs, anchors, now)


def appraise(
    evidence: bytes,
    policy: Policy | None = None,
    *,
    kind: str = "auto",
    nonce: bytes | None = None,
    report_data: bytes | None = None,
    now: datetime | None = None,
    inputs: Inputs = Inputs(),
    anchors: TrustAnchors = TrustAnchors(),
) -> Verdict:
    """Verify and evaluate: raises VerificationError for invalid evidence, else a verdict."""
    now = now or datetime.now(timezone.utc)
    policy = policy or default_policy()
    appraisal = verify(evidence, kind=kind, policy=policy, now=now, inputs=inputs, anchors=anchors, nonce=nonce)
    return Verdict(appraisal, evaluate(policy, appraisal, nonce=nonce, report_data=report_data, now=now))
