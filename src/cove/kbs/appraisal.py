"""Appraising tee-evidence: the verifier per tee type, and the report-data binding.

``runtime-data`` (the challenge's nonce and the TEE's public key) is hashed in
its canonical JSON form (keys sorted, no spaces, UTF-8): SHA-384 by default,
SHA-256 accepted. The evidence's report data must be that hash followed by
zero bytes; otherwise the evidence is bound to another nonce or another TEE
key and is refused (``EvidenceBinding``).

Each verifier is one of :mod:`cove.attest`'s, and its claims are normalized
by :mod:`cove.attest.appraisal`, so release policies read measurement,
signer, svn, debug, TCB status the same way for every type. The formats of
tee-evidence per type are in docs/formats/kbs-evidence.md.
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

from cove.attest import appraisal as attest_mod
from cove.attest.appraisal import Appraisal
from cove.errors import CoveError
from cove.kbs.problems import Problem

TEE_TYPES = attest_mod.EVIDENCE_TYPES  # cove, tpm, sgx, tdx, snp, sample
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
    """What the broker trusts to appraise hardware evidence; set by `cove kbs serve` options.

    Where an option is not given, the roots named in the attestation policy
    (``[sgx] roots``, ``[snp] roots``, ``[cove] ek_ca``/``ak_ca``) are used.
    """

    sgx_root_ca: bytes | None = None  # Intel SGX Root CA, PEM (sgx and tdx)
    snp_ask_ark: list[bytes] = field(default_factory=list)  # AMD ASK+ARK bundles, PEM
    tpm_aks: list[bytes] = field(default_factory=list)  # trusted TPM attestation keys, PEM
    cove_ek_roots: bytes | None = None  # TPM EK CA bundle for TPM-rooted cove evidence, PEM
    cove_ak_roots: bytes | None = None  # AK CA bundle (cove platform's AK certifier), PEM

    @classmethod
    def from_files(cls, sgx_root_ca: Path | None, snp_ask_ark: list[Path], tpm_aks: list[Path],
                   cove_ek_roots: Path | None = None, cove_ak_roots: Path | None = None) -> "TrustAnchors":
        def read(path: Path) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise CoveError(f"cannot read trust anchor {path}: {exc.strerror}") from None
        return cls(read(sgx_root_ca) if sgx_root_ca else None, [read(p) for p in snp_ask_ark],
                   [read(p) for p in tpm_aks], read(cove_ek_roots) if cove_ek_roots else None,
                   read(cove_ak_roots) if cove_ak_roots else None)

    def with_policy_roots(self, policy) -> "TrustAnchors":
        """Fill what the options left out from an attestation policy's trust roots."""
        def bundle(kind: str, name: str) -> bytes | None:
            rules = policy.rules.get(kind)
            return rules.pem(name) if rules is not None and getattr(rules, name) else None
        return TrustAnchors(self.sgx_root_ca or bundle("sgx", "roots") or bundle("tdx", "roots"),
                            self.snp_ask_ark or ([bundle("snp", "roots")] if bundle("snp", "roots") else []),
                            self.tpm_aks, self.cove_ek_roots or bundle("cove", "ek_ca"),
                            self.cove_ak_roots or bundle("cove", "ak_ca"))


Verifier = Callable[[dict, TrustAnchors, dt.datetime], Appraisal]


def _b64(evidence: dict, name: str, tee: str) -> bytes:
    value = evidence.get(name)
    if not isinstance(value, str):
        raise Problem("EvidenceInvalid", f"{tee} evidence lacks {name!r} (base64)")
    try:
        if "-" in value or "_" in value:
            return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        return base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise Problem("EvidenceInvalid", f"{tee} evidence {name!r} is not base64") from None


def _verified(tee: str, call):
    """Run a cove.attest verifier; its one error type becomes EvidenceInvalid."""
    try:
        return call()
    except CoveError as exc:
        line = exc.line()
        raise Problem("EvidenceInvalid", line if line.startswith(tee) else f"{tee}: {line}") from None


def _hex_claim(evidence: dict, name: str) -> bytes | None:
    value = evidence.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 128 or len(value) % 2:
        raise Problem("EvidenceInvalid", f"sample evidence {name!r} must be hex")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise Problem("EvidenceInvalid", f"sample evidence {name!r} must be hex") from None


def appraise_sample(evidence: dict, anchors: TrustAnchors, now: dt.datetime) -> Appraisal:
    """Unsigned claims for protocol tests: proves nothing, and the default policy refuses it."""
    report_data = _b64(evidence, "report_data", "sample")
    values: dict = {}
    for name, kind in (("svn", int), ("debug", bool), ("product_id", int)):
        if name in evidence:
            if type(evidence[name]) is not kind or (kind is int and not 0 <= evidence[name] < 1 << 63):
                raise Problem("EvidenceInvalid", f"sample evidence {name!r} must be {kind.__name__}")
            values[name] = evidence[name]
    return Appraisal(evidence_type="sample", measurement=_hex_claim(evidence, "measurement"),
                     signer=_hex_claim(evidence, "signer"), report_data=report_data, backend="sample",
                     isolation="none (sample evidence proves nothing)", **values)


def appraise_tpm(evidence: dict, anchors: TrustAnchors, now: dt.datetime) -> Appraisal:
    from cove.attest import verify_tpm_quote
    from cove.attest.errors import VerificationError

    attest = _b64(evidence, "quote", "tpm")
    signature = _b64(evidence, "signature", "tpm")
    pcrs = _b64(evidence, "pcrs", "tpm")
    if not anchors.tpm_aks:
        raise Problem("EvidenceInvalid", "tpm: this broker trusts no TPM attestation key (--tpm-ak)")
    last = ""
    for ak in anchors.tpm_aks:
        try:
            return attest_mod.from_tpm(verify_tpm_quote(attest, signature, pcrs, ak, None))
        except VerificationError as exc:
            last = exc.line()
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
        return attest_mod.from_dcap(_verified(tee, lambda: fn(quote, collateral, anchors.sgx_root_ca, now)))
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
            return attest_mod.from_snp(verify_snp_report(report, vcek, chain, now))
        except VerificationError as exc:
            last = exc.line()
    raise Problem("EvidenceInvalid", last or "snp: the report did not verify")


def appraise_cove(evidence: dict, anchors: TrustAnchors, now: dt.datetime) -> Appraisal:
    """Cove evidence (a platform-signed enclave report), verified by cove.attest."""
    try:
        from cove.attest import cove_verify
    except ImportError:
        raise Problem("EvidenceInvalid", "cove: this installation has no verifier for Cove evidence") from None
    raw = _b64(evidence, "evidence", "cove")
    claims = _verified("cove", lambda: cove_verify.verify_cove_evidence(
        raw, now, ek_roots=anchors.cove_ek_roots, ak_roots=anchors.cove_ak_roots))
    return cove_verify.appraisal(claims)


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


def appraise(tee: str, evidence, runtime_data: dict, anchors: TrustAnchors, now: dt.datetime) -> Appraisal:
    """Verify evidence of type tee and its binding to runtime_data; the appraisal, or a problem."""
    if isinstance(evidence, str):  # some clients send the evidence as a JSON string
        try:
            evidence = json.loads(evidence)
        except ValueError:
            raise Problem("EvidenceInvalid", f"{tee} tee-evidence is a string but not JSON") from None
    if isinstance(evidence, dict) and set(evidence) and set(evidence) <= {"primary_evidence", "additional_evidence"}:
        evidence = evidence.get("primary_evidence")  # the composite form of newer KBS clients
        if isinstance(evidence, str):
            try:
                evidence = json.loads(evidence)
            except ValueError:
                raise Problem("EvidenceInvalid", f"{tee} primary_evidence is a string but not JSON") from None
    if not isinstance(evidence, dict):
        raise Problem("EvidenceInvalid", f"{tee} tee-evidence must be a JSON object")
    result = VERIFIERS[tee](evidence, anchors, now)
    check_binding(result.report_data or b"", runtime_data)
    return result


# -- claims as JSON (sessions, tokens) and back -------------------------------------------------------
_BYTES = ("measurement", "signer", "report_data", "platform_key", "runtime", "ek_certificate", "ak_name")
_TIMES = ("issued_at", "platform_issued_at")


def to_claims(appraisal: Appraisal) -> dict:
    """The appraisal as JSON (what sessions store and tokens carry)."""
    claims = attest_mod.summary(appraisal)
    claims["tee"] = appraisal.evidence_type
    return claims


def from_claims(claims: dict) -> Appraisal:
    """The appraisal back from :func:`to_claims` (claims this broker stored or signed)."""
    values: dict = {}
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
