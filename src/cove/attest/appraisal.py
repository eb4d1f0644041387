"""What verified evidence says, in the one vocabulary a policy speaks.

Every verifier returns claims of its own shape (a DCAP report body, an SNP
report, a Cove report, PCR values). A policy must not care which: this
module maps each of them onto :class:`Appraisal`, so that the policy module
(and the key broker's release policies) read measurement, signer, debug,
TCB status and freshness the same way for every evidence type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cove.attest.dcap_quote import EnclaveReport

if TYPE_CHECKING:
    from cove.attest.dcap import DcapClaims
    from cove.attest.snp import SnpClaims
    from cove.attest.tpm import TpmQuoteClaims

EVIDENCE_TYPES = ("cove", "tpm", "sgx", "tdx", "snp", "sample")


@dataclass(frozen=True)
class Appraisal:
    """Verified claims, normalized; None means the evidence type has no such claim."""

    evidence_type: str
    measurement: bytes | None = None  # MRENCLAVE, MRTD, SNP MEASUREMENT or Cove measurement
    signer: bytes | None = None  # MRSIGNER, SNP ID key digest or Cove signer
    product_id: int | None = None
    svn: int | None = None
    debug: bool | None = None
    backend: str | None = None
    isolation: str | None = None
    tcb_status: str | None = None  # DCAP status; None where the evidence has none
    tcb: Mapping[str, int] = field(default_factory=dict)  # SNP reported TCB levels
    report_data: bytes | None = None  # the 64 bytes bound by the enclave (TPM: extraData)
    issued_at: datetime | None = None  # when the evidence was made, if it says
    platform_root: str | None = None  # cove: "tpm" or "self-certified"; hardware: the vendor
    platform_key: bytes | None = None  # cove: SHA-256 of the platform attestation key
    platform_issued_at: datetime | None = None  # cove: start of the platform key's epoch
    runtime: bytes | None = None  # cove: measurement of the installed runtime
    ek_certificate: bytes | None = None  # cove, TPM-rooted: SHA-256 of the TPM's EK certificate (DER)
    ak_name: bytes | None = None  # cove, TPM-rooted: TPM name of the attestation key that quoted
    launch_measurement: bytes | None = None  # cove, vm: the launch measurement its vTPM quoted
    pcrs: Mapping[str, Mapping[int, bytes]] = field(default_factory=dict)
    rtmrs: tuple[bytes, ...] = ()
    instance_id: str | None = None
    # init-data (Confidential Containers), once bound to the evidence's configuration field by the key
    # broker (cove.kbs.coco_evidence): its digest, the hash that made it, and its ``data`` table
    init_data: bytes | None = None
    init_data_algorithm: str | None = None
    init_data_claims: Mapping[str, Any] = field(default_factory=dict)
    claims: Mapping[str, Any] = field(default_factory=dict)  # everything, JSON-ready


_SCALARS = frozenset({str, int, float, bool})  # exact types only: subclasses take the general path


def jsonable(value: Any) -> Any:
    """Claims for JSON: bytes as hex, datetimes as ISO 8601, dataclasses as dicts."""
    if value is None or type(value) in _SCALARS:  # most leaves: skip the ABC checks below
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if value.microsecond else value.strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {k: jsonable(getattr(value, k)) for k in value.__dataclass_fields__ if k not in ("raw", "signed_bytes")}
    return value


def summary(appraisal: Appraisal) -> dict[str, Any]:
    """The normalized claims as a JSON-ready dict (no None values)."""
    out: dict[str, Any] = {}
    for name in Appraisal.__dataclass_fields__:
        if name == "claims":
            continue
        value = getattr(appraisal, name)
        if value is None or value == {} or value == ():
            continue
        out[name] = jsonable(value)
    return out


def from_dcap(claims: DcapClaims) -> Appraisal:
    """An SGX or TDX quote's claims (cove.attest.dcap.DcapClaims)."""
    body = claims.body
    if isinstance(body, EnclaveReport):  # an SGX quote; a TDX quote's body is a TdReport
        return Appraisal(
            evidence_type="sgx",
            measurement=body.mr_enclave,
            signer=body.mr_signer,
            product_id=body.isv_prod_id,
            svn=body.isv_svn,
            debug=body.attributes_decoded.debug,
            backend="sgx",
            isolation="CPU (Intel SGX)",
            tcb_status=claims.tcb_status,
            report_data=claims.report_data,
            platform_root="intel",
            claims=_dcap_claims(claims),
        )
    return Appraisal(
        evidence_type="tdx",
        measurement=body.mr_td,
        debug=body.td_attributes_decoded.debug,
        backend="tdx",
        isolation="CPU (Intel TDX)",
        tcb_status=claims.tcb_status,
        report_data=claims.report_data,
        platform_root="intel",
        rtmrs=tuple(body.rtmrs),
        claims=_dcap_claims(claims),
    )


def _dcap_claims(claims: DcapClaims) -> dict[str, Any]:
    return {
        "tee": claims.tee,
        "tcb_status": claims.tcb_status,
        "advisory_ids": list(claims.advisory_ids),
        "tcb_date": claims.tcb_date,
        "platform_status": claims.platform_status,
        "qe_status": claims.qe_status,
        "tdx_module_status": claims.tdx_module_status,
        "fmspc": claims.fmspc.hex(),
        "header": jsonable(claims.quote.header),
        "body": jsonable(claims.body),
    }


def from_snp(claims: SnpClaims) -> Appraisal:
    """An SEV-SNP report's claims (cove.attest.snp.SnpClaims)."""
    r = claims.report
    tcb = {
        "bootloader": r.reported_tcb.bootloader,
        "tee": r.reported_tcb.tee,
        "snp": r.reported_tcb.snp,
        "microcode": r.reported_tcb.microcode,
    }
    if r.reported_tcb.fmc is not None:
        tcb["fmc"] = r.reported_tcb.fmc
    return Appraisal(
        evidence_type="snp",
        measurement=r.measurement,
        signer=r.id_key_digest,
        svn=r.guest_svn,
        debug=r.policy.debug_allowed,
        backend="snp",
        isolation="CPU (AMD SEV-SNP)",
        tcb=tcb,
        report_data=r.report_data,
        platform_root="amd",
        claims={
            "product": claims.product,
            "signing_key": claims.signing_key,
            "endorsement": jsonable(claims.endorsement),
            "report": jsonable(r),
        },
    )


def from_tpm(claims: TpmQuoteClaims) -> Appraisal:
    """A TPM quote's claims (cove.attest.tpm.TpmQuoteClaims); extraData plays report data."""
    return Appraisal(
        evidence_type="tpm",
        report_data=claims.extra_data,
        pcrs=claims.pcrs,
        platform_root="tpm",
        claims={
            "pcrs": jsonable(claims.pcrs),
            "extra_data": claims.extra_data.hex(),
            "clock_info": jsonable(claims.clock_info),
            "firmware_version": claims.firmware_version,
            "signature": f"{claims.signature_scheme}/{claims.signature_hash}",
        },
    )
