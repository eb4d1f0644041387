"""Cove evidence: a platform-signed enclave report plus the platform's endorsement.

The encoding (versioned CBOR, docs/formats/evidence.md) is shared by the
platform that makes evidence and the verifier that checks it, so both live
here: dataclasses, encoders, a strict parser, and the two values the
platform and verifier must compute identically (the quote's qualifying data
and the expected value of Cove's PCR).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any
from datetime import datetime, timezone

import cbor2

from cove import decode
from cove.attest._cbor import Fields, loads
from cove.attest.errors import VerificationError

FORMAT = "cove"
VERSION = 1
ROOTS = ("tpm", "self-certified")
REPORT_CONTEXT = b"cove/report/v1\x00"  # prefixed to the report bytes the platform key signs
QUOTE_CONTEXT = b"cove/platform-quote/v1\x00"
DEFAULT_PCR = 23
BOOT_PCRS = (0, 1, 2, 3, 4, 5, 6, 7)
REPORT_DATA_SIZE = 64
# vm enclaves: the platform key certifies each VM's vTPM keys and launch PCR (VTPM_CONTEXT), and the
# vTPM quotes that PCR with qualifying data bound to the platform's report (VM_QUOTE_CONTEXT).
VTPM_CONTEXT = b"cove/vtpm-endorsement/v1\x00"
VM_QUOTE_CONTEXT = b"cove/vm-quote/v1\x00"
LAUNCH_PCR = 4  # in a firmware boot it holds the boot loader; here the direct boot's launch inputs

_EVIDENCE_KEYS = ("format", "version", "report", "signature", "endorsement", "vtpm")
_VTPM_KEYS = ("statement", "statement_signature", "attest", "signature", "pcrs")
_STATEMENT_KEYS = ("ek", "ak", "pcr", "launch", "instance_id")
_REPORT_KEYS = (
    "version",
    "measurement",
    "signer",
    "product_id",
    "svn",
    "debug",
    "backend",
    "isolation",
    "instance_id",
    "report_data",
    "timestamp",
    "platform_key",
    "root",
    "endorsement",
)
_ENDORSEMENT_KEYS = ("root", "pak", "runtime", "epoch", "epoch_start", "tpm")
_TPM_KEYS = ("attest", "signature", "pcrs", "pcr", "ak", "ak_chain", "ek_chain")


@dataclass(frozen=True)
class Report:
    """What the platform states about one enclave; the enclave chose only report_data."""

    measurement: bytes
    signer: bytes
    product_id: int
    svn: int
    debug: bool
    backend: str
    isolation: str
    instance_id: str
    report_data: bytes
    timestamp_ms: int
    platform_key: bytes  # SHA-256 of the platform attestation key (SubjectPublicKeyInfo DER)
    root: str  # "tpm" or "self-certified": every report says which
    endorsement: bytes  # SHA-256 of the endorsement bytes this report goes with
    version: int = VERSION

    @property
    def timestamp(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp_ms / 1000, timezone.utc)


@dataclass(frozen=True)
class TpmEndorsement:
    """The TPM's word for the platform key: a quote and the keys and certificates behind it."""

    attest: bytes  # TPMS_ATTEST
    signature: bytes  # TPMT_SIGNATURE
    pcrs: dict[str, dict[int, bytes]]
    pcr: int  # the PCR Cove extends with the runtime and the platform key
    ak: bytes  # TPM2B_PUBLIC of the attestation key
    ak_chain: tuple[bytes, ...]  # DER: AK certificate first, then its CA's chain
    ek_chain: tuple[bytes, ...]  # DER: EK certificate first


@dataclass(frozen=True)
class Endorsement:
    root: str
    pak: bytes  # SubjectPublicKeyInfo DER
    runtime: bytes
    epoch: bytes
    epoch_start_ms: int
    tpm: TpmEndorsement | None = None

    @property
    def epoch_start(self) -> datetime:
        return datetime.fromtimestamp(self.epoch_start_ms / 1000, timezone.utc)


@dataclass(frozen=True)
class VtpmStatement:
    """What the platform key certifies about one VM's vTPM (docs/formats/evidence.md)."""

    ek: bytes  # TPM2B_PUBLIC of the vTPM's endorsement key
    ak: bytes  # TPM2B_PUBLIC of the attestation key made under it
    pcr: int  # the PCR that holds the launch measurement
    launch: bytes  # the vm launch measurement extended into it (SHA-256)
    # the run whose reports the vTPM quotes (the reports' instance_id): a quote by another VM's vTPM,
    # certified for another run, never goes with this report. Empty until the launcher certifies it.
    instance_id: str = ""


@dataclass(frozen=True)
class VtpmQuote:
    """A vm enclave's vTPM quote of its launch PCR, bound to the platform's report."""

    statement: VtpmStatement
    statement_bytes: bytes  # exactly what the platform key signed (after VTPM_CONTEXT)
    statement_signature: bytes  # ECDSA P-256 SHA-256, DER, by the platform key
    attest: bytes  # TPMS_ATTEST
    signature: bytes  # TPMT_SIGNATURE
    pcrs: dict[str, dict[int, bytes]]


@dataclass(frozen=True)
class Evidence:
    report: Report
    report_bytes: bytes  # exactly what was signed (after REPORT_CONTEXT)
    signature: bytes  # ECDSA P-256 SHA-256, DER
    endorsement: Endorsement
    endorsement_bytes: bytes  # exactly what the report's endorsement digest covers
    vtpm: VtpmQuote | None = None  # vm enclaves only


def pak_hash(spki_der: bytes) -> bytes:
    return hashlib.sha256(spki_der).digest()


def quote_qualifier(pak: bytes, runtime: bytes, epoch: bytes, epoch_start_ms: int) -> bytes:
    """The quote's qualifying data: binds the platform key, runtime and epoch to the TPM quote."""
    return hashlib.sha256(QUOTE_CONTEXT + pak_hash(pak) + runtime + epoch + struct.pack(">Q", epoch_start_ms)).digest()


def vm_quote_qualifier(report_bytes: bytes) -> bytes:
    """The vTPM quote's qualifying data: binds it to one platform-signed report."""
    return hashlib.sha256(VM_QUOTE_CONTEXT + report_bytes).digest()


def launch_pcr_value(launch: bytes) -> bytes:
    """The launch PCR after the vTPM started and the launch measurement was extended once."""
    return hashlib.sha256(bytes(32) + launch).digest()


def encode_vtpm_statement(statement: VtpmStatement) -> bytes:
    return cbor2.dumps(
        {
            "ek": statement.ek,
            "ak": statement.ak,
            "pcr": statement.pcr,
            "launch": statement.launch,
            "instance_id": statement.instance_id,
        },
        canonical=True,
    )


def platform_pcr_value(runtime: bytes, pak_digest: bytes) -> bytes:
    """Cove's PCR after a reset and two extends: the runtime, then the platform key hash."""
    value = bytes(32)
    for digest in (runtime, pak_digest):
        value = hashlib.sha256(value + digest).digest()
    return value


def encode_report(report: Report) -> bytes:
    """Canonical CBOR of a report (the bytes the platform key signs)."""
    return cbor2.dumps(
        {
            "version": report.version,
            "measurement": report.measurement,
            "signer": report.signer,
            "product_id": report.product_id,
            "svn": report.svn,
            "debug": report.debug,
            "backend": report.backend,
            "isolation": report.isolation,
            "instance_id": report.instance_id,
            "report_data": report.report_data,
            "timestamp": report.timestamp_ms,
            "platform_key": report.platform_key,
            "root": report.root,
            "endorsement": report.endorsement,
        },
        canonical=True,
    )


def endorsement_map(e: Endorsement) -> dict[str, Any]:
    out = {"root": e.root, "pak": e.pak, "runtime": e.runtime, "epoch": e.epoch, "epoch_start": e.epoch_start_ms}
    if e.tpm is not None:
        t = e.tpm
        out["tpm"] = {
            "attest": t.attest,
            "signature": t.signature,
            "pcrs": t.pcrs,
            "pcr": t.pcr,
            "ak": t.ak,
            "ak_chain": list(t.ak_chain),
            "ek_chain": list(t.ek_chain),
        }
    return out


def encode_evidence(
    report_bytes: bytes, signature: bytes, endorsement_bytes: bytes, vtpm: VtpmQuote | None = None
) -> bytes:
    """The evidence document; ``endorsement_bytes`` from :func:`encode_endorsement`."""
    document = {
        "format": FORMAT,
        "version": VERSION,
        "report": report_bytes,
        "signature": signature,
        "endorsement": endorsement_bytes,
    }
    if vtpm is not None:
        document["vtpm"] = {
            "statement": vtpm.statement_bytes,
            "statement_signature": vtpm.statement_signature,
            "attest": vtpm.attest,
            "signature": vtpm.signature,
            "pcrs": vtpm.pcrs,
        }
    return cbor2.dumps(document, canonical=True)


def endorsement_digest(endorsement_bytes: bytes) -> bytes:
    return hashlib.sha256(endorsement_bytes).digest()


def encode_endorsement(e: Endorsement) -> bytes:
    return cbor2.dumps(endorsement_map(e), canonical=True)


def looks_like_cove(data: bytes) -> bool:
    """Cheap check for auto-detection: a CBOR map whose format is "cove"."""
    try:
        value = loads(data, "cove", "evidence")
    except VerificationError:
        return False
    return isinstance(value, dict) and value.get("format") == FORMAT


def parse_report(data: bytes) -> Report:
    f = Fields(loads(data, "cove", "report"), "cove", "report", _REPORT_KEYS)
    version = f.uint("version")
    if version != VERSION:
        raise VerificationError(f"cove: report version {version} is not supported (only {VERSION})")
    return Report(
        measurement=f.bytes("measurement", 32),
        signer=f.bytes("signer", 32),
        product_id=f.uint("product_id"),
        svn=f.uint("svn"),
        debug=f.boolean("debug"),
        backend=f.text("backend", max_len=32),
        isolation=f.text("isolation", max_len=128),
        instance_id=f.text("instance_id", max_len=64),
        report_data=f.bytes("report_data", REPORT_DATA_SIZE),
        timestamp_ms=f.uint("timestamp"),
        platform_key=f.bytes("platform_key", 32),
        root=f.text("root", ROOTS),
        endorsement=f.bytes("endorsement", 32),
        version=version,
    )


def load_endorsement(data: bytes, what: str = "endorsement") -> Endorsement:
    """An endorsement from its CBOR bytes (as stored by the platform layer)."""
    return parse_endorsement(loads(data, "cove", what))


def parse_endorsement(value: object) -> Endorsement:
    f = Fields(value, "cove", "endorsement", _ENDORSEMENT_KEYS)
    root = f.text("root", ROOTS)
    tpm = None
    if root == "tpm":
        t = f.sub("tpm", _TPM_KEYS)
        tpm = TpmEndorsement(
            attest=t.bytes("attest", max_size=1024),
            signature=t.bytes("signature", max_size=1024),
            pcrs=_pcrs(t.map.get("pcrs")),
            pcr=t.uint("pcr", 23),
            ak=t.bytes("ak", max_size=1024),
            ak_chain=t.byte_list("ak_chain"),
            ek_chain=t.byte_list("ek_chain"),
        )
    elif f.has("tpm"):
        raise VerificationError("cove: a self-certified endorsement carries a TPM quote")
    return Endorsement(
        root=root,
        pak=f.bytes("pak", max_size=512),
        runtime=f.bytes("runtime", 32),
        epoch=f.bytes("epoch", 16),
        epoch_start_ms=f.uint("epoch_start"),
        tpm=tpm,
    )


def _pcrs(value: object) -> dict[str, dict[int, bytes]]:
    sizes = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
    if not isinstance(value, dict) or not value or len(value) > 4:
        raise VerificationError("cove: endorsement tpm pcrs must map a bank to PCR values")
    out: dict[str, dict[int, bytes]] = {}
    for bank, values in value.items():
        if bank not in sizes or not isinstance(values, dict) or not 1 <= len(values) <= 24:
            raise VerificationError("cove: endorsement tpm pcrs has an unknown bank or no values")
        out[bank] = {}
        for idx, digest in values.items():
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx <= 23:
                raise VerificationError("cove: endorsement tpm pcrs index must be 0 to 23")
            if not isinstance(digest, bytes) or len(digest) != sizes[bank]:
                raise VerificationError(f"cove: endorsement tpm pcrs {bank}:{idx} has the wrong size")
            out[bank][idx] = digest
    return out


def parse_evidence(data: bytes) -> Evidence:
    """Parse (not verify) Cove evidence; malformed input raises VerificationError."""
    f = Fields(loads(data, "cove", "evidence"), "cove", "evidence", _EVIDENCE_KEYS)
    fmt = f.text("format")
    if fmt != FORMAT:
        raise VerificationError(f"cove: evidence format {fmt[:40]!r} is not {FORMAT!r}")
    version = f.uint("version")
    if version != VERSION:
        raise VerificationError(f"cove: evidence version {version} is not supported (only {VERSION})")
    report_bytes = f.bytes("report", max_size=4096)
    endorsement_bytes = f.bytes("endorsement", max_size=65536)
    vtpm = _parse_vtpm(f.sub("vtpm", _VTPM_KEYS)) if f.has("vtpm") else None
    return Evidence(
        report=parse_report(report_bytes),
        report_bytes=report_bytes,
        signature=f.bytes("signature", max_size=256),
        endorsement=parse_endorsement(loads(endorsement_bytes, "cove", "endorsement")),
        endorsement_bytes=endorsement_bytes,
        vtpm=vtpm,
    )


def _parse_vtpm(t: decode.Fields) -> VtpmQuote:
    statement_bytes = t.bytes("statement", max_size=4096)
    s = Fields(loads(statement_bytes, "cove", "vtpm statement"), "cove", "vtpm statement", _STATEMENT_KEYS)
    statement = VtpmStatement(
        ek=s.bytes("ek", max_size=1024),
        ak=s.bytes("ak", max_size=1024),
        pcr=s.uint("pcr", 23),
        launch=s.bytes("launch", 32),
        instance_id=s.text("instance_id", max_len=64),
    )
    return VtpmQuote(
        statement=statement,
        statement_bytes=statement_bytes,
        statement_signature=t.bytes("statement_signature", max_size=256),
        attest=t.bytes("attest", max_size=1024),
        signature=t.bytes("signature", max_size=1024),
        pcrs=_pcrs(t.map.get("pcrs")),
    )
