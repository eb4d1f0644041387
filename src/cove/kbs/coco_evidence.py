"""tee-evidence in the shapes the Confidential Containers attesters send, turned into Cove's inputs.

An attestation from the CoCo client carries ``tee-evidence`` as the composite
``{"primary_evidence": <the attester's JSON>, "additional_evidence": "<JSON string or empty>"}``
(kbs-types 0.18 ``CompositeEvidence``) and ``init-data`` as ``{"format": "toml", "body": ...}`` or
null. This module unpacks those and adapts each attester's shape to the one
:mod:`cove.kbs.evidence_appraisal` verifies; Cove's own shapes pass through unchanged.
The shapes were read from guest-components ``attestation-agent/attester/src``
@ 8246e5e0977f6322f0a1b0f77e0739cf1c3e1f74 and Trustee ``deps/verifier/src``
@ 78962cd416dcc8a32f9377e0066a28fe21420f69 (docs/formats/kbs-evidence.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cove.decode import decode_json, decode_toml
from cove.errors import CoveError
from cove.kbs.coco_collateral import CollateralSource
from cove.kbs.problems import Problem

if TYPE_CHECKING:
    import datetime as dt

    from cove.attest.appraisal import Appraisal
    from cove.kbs.evidence_appraisal import TrustAnchors

Adapter = Callable[[dict[str, Any], CollateralSource], dict[str, Any]]

MAX_INIT_DATA = 64 << 10
INIT_DATA_HASHES = ("sha256", "sha384", "sha512")  # Trustee's Initdata.algorithm values


def _json_object(value: Any, what: str) -> Any:
    if isinstance(value, str):  # some clients send JSON as a string
        value = decode_json(value, _invalid_evidence, f"{what} (a string)")
    return value


def _invalid_evidence(message: str) -> Problem:
    return Problem("EvidenceInvalid", message)


def _invalid_request(message: str) -> Problem:
    return Problem("InvalidRequest", message)


def unpack(tee: str, tee_evidence: Any, collateral: CollateralSource | None = None) -> tuple[dict[str, Any], str]:
    """(the primary evidence in Cove's shape, the additional_evidence string as sent).

    ``collateral``: where DCAP collateral comes from when a quote arrives without it."""
    evidence = _json_object(tee_evidence, f"{tee} tee-evidence")
    additional = ""
    if isinstance(evidence, dict) and set(evidence) and set(evidence) <= {"primary_evidence", "additional_evidence"}:
        additional = evidence.get("additional_evidence", "")
        if not isinstance(additional, str):
            raise Problem("EvidenceInvalid", "additional_evidence must be a string (JSON of a map, or empty)")
        evidence = _json_object(evidence.get("primary_evidence"), f"{tee} primary_evidence")
    if not isinstance(evidence, dict):
        raise Problem("EvidenceInvalid", f"{tee} tee-evidence must be a JSON object")
    adapt = ADAPTERS.get(tee)
    return (adapt(evidence, collateral or CollateralSource()) if adapt else evidence), additional


def _b64(evidence: dict[str, Any], name: str, tee: str) -> bytes:
    value = evidence.get(name)
    try:
        if not isinstance(value, str):
            raise ValueError
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Problem("EvidenceInvalid", f"{tee} evidence {name!r} must be standard base64") from None


def _dcap(tee: str) -> Adapter:
    """guest-components attester/src/sgx_dcap: ``{"quote"}``; attester/src/tdx: ``{"cc_eventlog", "quote"}``,
    both base64, no collateral: it comes from the broker's collateral folder or its PCCS. The TDX event
    log must replay to the quote's RTMRs (as Trustee's tdx verifier checks) before the quote is verified."""

    def adapt(evidence: dict[str, Any], collateral: CollateralSource) -> dict[str, Any]:
        if "collateral" in evidence:  # Cove's own shape
            return evidence
        quote = _b64(evidence, "quote", tee)
        if tee == "tdx" and evidence.get("cc_eventlog") is not None:
            check_rtmrs(_b64(evidence, "cc_eventlog", tee), quote)
        return {"quote": evidence["quote"], "collateral": collateral.collateral_for(tee, quote)}

    return adapt


def replay_rtmrs(event_log: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """RTMR0..3 as a CC event log (TCG2 format, SHA-384, MR index 1..4 = RTMR0..3) extends them from zero.

    The attester trims the CCEL table's padding and ends the log with 8 bytes of 0xFF
    (guest-components attester/src/utils.rs: trim_ccel, EL_END_FLAG)."""
    from cove.attest.eventlog import EV_NO_ACTION, parse_event_log

    body = event_log[:-8] if event_log.endswith(END_FLAG) else event_log
    try:
        log = parse_event_log(body)
    except CoveError as exc:
        raise Problem("EvidenceInvalid", f"tdx: cc_eventlog does not parse: {exc.line()}") from None
    if "sha384" not in log.banks:
        raise Problem("EvidenceInvalid", "tdx: cc_eventlog has no SHA-384 digests")
    rtmrs = [bytes(48)] * 4
    for event in log.events:
        if event.type == EV_NO_ACTION or not 1 <= event.pcr <= 4 or "sha384" not in event.digests:
            continue
        index = event.pcr - 1
        rtmrs[index] = hashlib.sha384(rtmrs[index] + event.digests["sha384"]).digest()
    return tuple(rtmrs)  # type: ignore[return-value]


END_FLAG = b"\xff" * 8


def check_rtmrs(event_log: bytes, quote: bytes) -> None:
    from cove.attest.dcap_quote import parse_dcap_quote

    try:
        body = parse_dcap_quote(quote).body
    except CoveError as exc:
        raise Problem("EvidenceInvalid", f"tdx: {exc.line()}") from None
    quoted = getattr(body, "rtmrs", None)
    if quoted is None:
        raise Problem("EvidenceInvalid", "tdx: the quote is not a TD quote")
    for index, (replayed, value) in enumerate(zip(replay_rtmrs(event_log), quoted)):
        if not hmac.compare_digest(replayed, value):
            raise Problem(
                "EvidenceInvalid",
                f"tdx: cc_eventlog replays RTMR{index} to {replayed.hex()[:16]}..., "
                f"the quote says {value.hex()[:16]}...: not the log this TD measured",
            )


def _sample(evidence: dict[str, Any], collateral: CollateralSource) -> dict[str, Any]:
    """guest-components attester/src/sample: ``{"svn": "1", "report_data": base64}``, svn a decimal string."""
    svn = evidence.get("svn")
    if isinstance(svn, str):
        if not (svn.isascii() and svn.isdigit() and len(svn) <= 18):
            raise Problem("EvidenceInvalid", "sample evidence 'svn' must be a decimal number")
        evidence = dict(evidence, svn=int(svn))
    return evidence


def _tpm(evidence: dict[str, Any], collateral: CollateralSource) -> dict[str, Any]:
    """guest-components attester/src/tpm: ``{"tpm_quote": {"signature", "message", "pcrs"}, "ak_public"}``:
    base64 TPMT_SIGNATURE and TPMS_ATTEST, the 24 SHA-256 PCRs as hex, the AK as base64 DER. The AK is
    only a hint: the quote must verify with one of the broker's trusted AKs (``--tpm-ak``)."""
    if "tpm_quote" not in evidence:  # Cove's own shape
        return evidence
    quote = evidence["tpm_quote"]
    if not isinstance(quote, dict) or not isinstance(quote.get("pcrs"), list) or len(quote["pcrs"]) > 24:
        raise Problem("EvidenceInvalid", "tpm evidence: tpm_quote must hold signature, message and up to 24 pcrs")
    values = []
    for value in quote["pcrs"]:
        try:
            digest = bytes.fromhex(value) if isinstance(value, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise Problem("EvidenceInvalid", "tpm evidence: each of tpm_quote.pcrs must be 64 hex digits (SHA-256)")
        values.append(digest)
    _b64(quote, "message", "tpm")
    _b64(quote, "signature", "tpm")
    return {
        "quote": quote["message"],
        "signature": quote["signature"],
        "pcrs": base64.b64encode(pcr_file(values)).decode(),
    }


def pcr_file(sha256_values: list[bytes]) -> bytes:
    """SHA-256 PCRs 0..n-1 in the layout tpm2_quote writes with ``-o`` (the C structs: TPML_PCR_SELECTION
    with 16 TPMS_PCR_SELECTION slots of 8 bytes, then TPML_DIGEST lists of 8 TPM2B_DIGEST slots of 66 bytes)."""
    bitmap = sum(1 << index for index in range(len(sha256_values))).to_bytes(4, "little")
    out = bytearray((1).to_bytes(4, "little"))
    out += (0x000B).to_bytes(2, "little") + bytes([3]) + bitmap + bytes(1)
    out += bytes(8 * 15)
    lists = [sha256_values[i : i + 8] for i in range(0, len(sha256_values), 8)]
    out += len(lists).to_bytes(4, "little")
    for chunk in lists:
        out += len(chunk).to_bytes(4, "little")
        for slot in range(8):
            digest = chunk[slot] if slot < len(chunk) else b""
            out += len(digest).to_bytes(2, "little") + digest + bytes(64 - len(digest))
    return bytes(out)


def _snp(evidence: dict[str, Any], collateral: CollateralSource) -> dict[str, Any]:
    """guest-components attester/src/snp: ``{"attestation_report": <sev's AttestationReport as JSON>,
    "cert_chain": [{"cert_type": "VCEK" | "VLEK" | ..., "data": [bytes]}] | null}``; the report's
    bytes are rebuilt (the signature covers them) and the VCEK or VLEK taken from the chain."""
    if "attestation_report" not in evidence:  # Cove's own shape
        return evidence
    report = snp_report_bytes(evidence["attestation_report"])
    key = None
    for entry in evidence.get("cert_chain") or []:
        if isinstance(entry, dict) and entry.get("cert_type") in ("VCEK", "VLEK"):
            key = _byte_list(entry.get("data"), None, "cert_chain data")
            break
    if key is None:
        raise Problem(
            "EvidenceInvalid",
            "snp evidence: cert_chain holds no VCEK or VLEK (the host serves none); "
            "configure the host's extended report certificates",
        )
    return {"report": base64.b64encode(report).decode(), "vcek": base64.b64encode(key).decode()}


def _byte_list(value: Any, size: int | None, what: str) -> bytes:
    """A serde byte array (a JSON list of integers 0..255), of ``size`` bytes if given."""
    if (
        not isinstance(value, list)
        or (size is not None and len(value) != size)
        or len(value) > 1 << 14
        or not all(type(b) is int and 0 <= b <= 255 for b in value)
    ):
        raise Problem("EvidenceInvalid", f"snp evidence: {what} must be a list of {size or 'some'} bytes")
    return bytes(value)


def _int(report: dict[str, Any], name: str, size: int, default: int | None = None) -> bytes:
    value = report.get(name, default)
    if value is None and default is not None:
        value = default
    if type(value) is not int or not 0 <= value < 1 << (8 * size):
        raise Problem("EvidenceInvalid", f"snp evidence: attestation_report.{name} must be a {8 * size}-bit integer")
    return value.to_bytes(size, "little")


def _tcb(report: dict[str, Any], name: str, turin: bool) -> bytes:
    """sev TcbVersion {fmc, bootloader, tee, snp, microcode} in the report's layout (Milan/Genoa or Turin)."""
    tcb = report.get(name)
    if not isinstance(tcb, dict):
        raise Problem("EvidenceInvalid", f"snp evidence: attestation_report.{name} must be a TCB object")
    part = {
        key: _int(tcb, key, 1, 0 if key == "fmc" else None)[0]
        for key in ("fmc", "bootloader", "tee", "snp", "microcode")
    }
    if turin:
        return bytes([part["fmc"], part["bootloader"], part["tee"], part["snp"], 0, 0, 0, part["microcode"]])
    return bytes([part["bootloader"], part["tee"], 0, 0, 0, 0, part["snp"], part["microcode"]])


def _version(report: dict[str, Any], name: str) -> bytes:
    """sev Version {major, minor, build}, or the older layout's <name>_build/_minor/_major members."""
    value = report.get(name)
    if value is None:
        value = {part: report.get(f"{name}_{part}") for part in ("build", "minor", "major")}
    if not isinstance(value, dict):
        raise Problem("EvidenceInvalid", f"snp evidence: attestation_report.{name} must be a version object")
    return bytes(_int(value, part, 1)[0] for part in ("build", "minor", "major"))


def snp_report_bytes(report: Any) -> bytes:
    """The 1184 bytes of an SNP attestation report from the sev crate's serde JSON of AttestationReport
    (virtee/sev v6.3 src/firmware/guest/types/snp.rs: from_bytes/write_bytes; the byte offsets are
    those of AMD's SEV-SNP ABI, table "ATTESTATION_REPORT"). Reserved bytes are zero; if the JSON
    was not made from a genuine report, the VCEK's signature does not verify."""
    if not isinstance(report, dict):
        raise Problem("EvidenceInvalid", "snp evidence: attestation_report must be an object")
    version = int.from_bytes(_int(report, "version", 4), "little")
    chip_id = _byte_list(report.get("chip_id"), 64, "chip_id")
    if version == 2:
        turin = chip_id[8:] == bytes(56) and chip_id != bytes(64)
    else:  # CPUID family 0x1A is Turin
        turin = report.get("cpuid_fam_id") == 0x1A
    key_info = report.get("key_info", report.get("_author_key_en", 0))
    out = bytearray(1184)

    def put(offset: int, data: bytes) -> None:
        out[offset : offset + len(data)] = data

    put(0x00, _int(report, "version", 4))
    put(0x04, _int(report, "guest_svn", 4))
    put(0x08, _int(report, "policy", 8))
    put(0x10, _byte_list(report.get("family_id"), 16, "family_id"))
    put(0x20, _byte_list(report.get("image_id"), 16, "image_id"))
    put(0x30, _int(report, "vmpl", 4))
    put(0x34, _int(report, "sig_algo", 4))
    put(0x38, _tcb(report, "current_tcb", turin))
    put(0x40, _int(report, "plat_info", 8))
    put(0x48, _int({"key_info": key_info}, "key_info", 4))
    put(0x50, _byte_list(report.get("report_data"), 64, "report_data"))
    put(0x90, _byte_list(report.get("measurement"), 48, "measurement"))
    put(0xC0, _byte_list(report.get("host_data"), 32, "host_data"))
    put(0xE0, _byte_list(report.get("id_key_digest"), 48, "id_key_digest"))
    put(0x110, _byte_list(report.get("author_key_digest"), 48, "author_key_digest"))
    put(0x140, _byte_list(report.get("report_id"), 32, "report_id"))
    put(0x160, _byte_list(report.get("report_id_ma"), 32, "report_id_ma"))
    put(0x180, _tcb(report, "reported_tcb", turin))
    if version >= 3:
        put(
            0x188,
            _int(report, "cpuid_fam_id", 1, 0) + _int(report, "cpuid_mod_id", 1, 0) + _int(report, "cpuid_step", 1, 0),
        )
    put(0x1A0, chip_id)
    put(0x1E0, _tcb(report, "committed_tcb", turin))
    put(0x1E8, _version(report, "current"))
    put(0x1EC, _version(report, "committed"))
    put(0x1F0, _tcb(report, "launch_tcb", turin))
    if version >= 5:
        put(0x1F8, _int(report, "launch_mit_vector", 8, 0) + _int(report, "current_mit_vector", 8, 0))
    signature = report.get("signature")
    if not isinstance(signature, dict):
        raise Problem("EvidenceInvalid", "snp evidence: attestation_report.signature must be {r, s}")
    put(0x2A0, _byte_list(signature.get("r"), 72, "signature.r") + _byte_list(signature.get("s"), 72, "signature.s"))
    return bytes(out)


ADAPTERS = {"sample": _sample, "sgx": _dcap("sgx"), "tdx": _dcap("tdx"), "tpm": _tpm, "snp": _snp}


def normalize_tee(tee: object) -> str:
    """The session's tee: one :mod:`cove.kbs.evidence_appraisal` verifies, or a composite one verified here."""
    from cove.kbs import coco_azure, evidence_appraisal

    if isinstance(tee, str) and tee in coco_azure.TEES:
        return tee
    try:
        return evidence_appraisal.normalize_tee(tee)
    except Problem as problem:
        if not isinstance(tee, str):
            raise
        known = ", ".join((*evidence_appraisal.TEE_TYPES, *coco_azure.TEES))
        raise Problem(
            "UnknownTee",
            f"tee {tee[:32]!r} is not verified by this broker (it verifies {known}; docs/formats/kbs-evidence.md)",
        ) from problem


def appraise(
    tee: str, evidence: dict[str, Any], runtime_data: dict[str, Any], anchors: TrustAnchors, now: dt.datetime
) -> Appraisal:
    """Verify the (adapted) evidence and its binding to runtime_data: :func:`cove.kbs.evidence_appraisal.appraise`,
    or, for the vTPM-through-SNP shape, :mod:`cove.kbs.coco_azure`."""
    from cove.kbs import coco_azure, evidence_appraisal

    if tee in coco_azure.TEES:
        return coco_azure.appraise(tee, evidence, runtime_data, anchors, now)
    return evidence_appraisal.appraise(tee, evidence, runtime_data, anchors, now)


def check_additional(additional: str) -> None:
    """Device evidence (``additional_evidence``): none of the device TEEs the CoCo attesters report
    (nvidia, dpu, hygondcu, sampledevice, ...) has a verifier in Cove, so any entry is refused,
    never dropped: a token must not suggest that a device was appraised when it was not."""
    if additional == "":
        return
    entries = decode_json(additional, _invalid_evidence, "additional_evidence")
    if not isinstance(entries, dict):
        raise Problem("EvidenceInvalid", "additional_evidence must be a JSON object (tee -> evidence)")
    if entries:
        names = ", ".join(sorted(str(name) for name in entries)[:8])
        raise Problem(
            "EvidenceInvalid",
            f"additional evidence for {names} cannot be verified by this broker "
            f"(no device TEE verifier); attest without device evidence",
        )


@dataclass(frozen=True)
class InitData:
    """init-data as Trustee reads it: TOML with ``algorithm``, ``version`` and a ``data`` table;
    its digest is the algorithm's hash of the body's bytes."""

    algorithm: str
    digest: bytes
    data: dict[str, Any] = field(default_factory=dict)


def init_data(value: Any) -> InitData | None:
    """The attestation's init-data, parsed; None when absent (null or missing)."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("body"), str):
        raise Problem("InvalidRequest", 'init-data must be {"format": "toml", "body": <string>}')
    if value.get("format") != "toml":
        raise Problem("InvalidRequest", f"init-data format {value.get('format')!r} is not supported (toml)")
    body = value["body"]
    if len(body) > MAX_INIT_DATA:
        raise Problem("InvalidRequest", f"init-data is larger than {MAX_INIT_DATA >> 10} KiB")
    parsed = decode_toml(body, _invalid_request, "init-data", limit=MAX_INIT_DATA)
    algorithm = parsed.get("algorithm")
    if algorithm not in INIT_DATA_HASHES:
        raise Problem(
            "InvalidRequest", f"init-data algorithm {algorithm!r} is not one of {', '.join(INIT_DATA_HASHES)}"
        )
    data = parsed.get("data", {})
    if not isinstance(data, dict):
        raise Problem("InvalidRequest", "init-data data must be a table")
    return InitData(algorithm, hashlib.new(algorithm, body.encode()).digest(), data)


# Where each TEE carries the host-chosen configuration digest init-data is bound to (Trustee's
# verifiers: tdx compares MRCONFIGID, snp HOSTDATA, each zero-padded); the appraisal's claims path.
_CONFIG_FIELD = {"tdx": (("body", "mr_config_id"), 48), "snp": (("report", "host_data"), 32)}


def bind_init_data(tee: str, result: Appraisal, init: InitData | None) -> dict[str, Any]:
    """The init-data claims to add to the attestation's claims, once init-data is bound to the evidence.

    ``sample`` proves nothing, so (as Trustee's sample verifier does) its init-data is reported, not
    checked. TDX and SNP compare the digest with MRCONFIGID / HOSTDATA; TPM and az-snp-vtpm quotes
    with PCR 8, which the attester extends once with it. Cove evidence has no host-chosen
    configuration field (an enclave's configuration is in its measurement), so init-data with it
    is refused rather than passed on unchecked.
    """
    if init is None:
        return {}
    claims = {"init_data": init.digest.hex(), "init_data_algorithm": init.algorithm, "init_data_claims": init.data}
    if tee == "sample":
        return claims
    if tee in ("tpm", "az-snp-vtpm"):  # Trustee: PCR 8 = SHA-256(32 zero bytes || the init-data digest)
        pcr8 = (result.pcrs.get("sha256") or {}).get(8)
        if (
            len(init.digest) != 32
            or pcr8 is None
            or not hmac.compare_digest(pcr8, hashlib.sha256(bytes(32) + init.digest).digest())
        ):
            raise Problem("EvidenceBinding", "init-data's digest is not the one extended into the vTPM's PCR 8")
        return claims
    where = _CONFIG_FIELD.get(tee)
    if where is None:
        raise Problem(
            "EvidenceInvalid",
            f"init-data cannot be bound to {tee} evidence (it has no configuration field); attest without init-data",
        )
    (outer, inner), size = where
    value = (result.claims.get(outer) or {}).get(inner) if isinstance(result.claims, dict) else None
    expected = (init.digest + bytes(size))[:size] if len(init.digest) <= size else None
    if not isinstance(value, str) or expected is None or not hmac.compare_digest(bytes.fromhex(value), expected):
        raise Problem(
            "EvidenceBinding",
            f"init-data's {init.algorithm} digest is not the {tee} evidence's "
            f"{'MRCONFIGID' if tee == 'tdx' else 'HOSTDATA'}",
        )
    return claims
