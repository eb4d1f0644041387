"""Appraising a platform against Intel's TCB info and QE identity.

Finds the first TCB level the platform meets (SGX components and PCE SVN from
the PCK certificate, TDX components from the TD report), the TDX module's
level, the QE's level, and folds them into one status as Intel's QVL does.
"""

from __future__ import annotations

from dataclasses import dataclass

from cove.attest.dcap_collateral import IsvLevel, QeIdentity, TcbInfo, TcbLevel
from cove.attest.dcap_quote import EnclaveReport, TdReport
from cove.attest.errors import VerificationError
from cove.attest.pck import PckExtension


@dataclass(frozen=True)
class TcbVerdict:
    status: str
    advisory_ids: tuple[str, ...]
    tcb_date: str
    platform_status: str
    qe_status: str
    tdx_module_status: str | None


def _and(a: bytes, b: bytes) -> bytes:
    return bytes(x & y for x, y in zip(a, b))


def platform_level(info: TcbInfo, pck: PckExtension, td: TdReport | None, kind: str) -> TcbLevel:
    """The first (highest) level whose every SVN the platform meets."""
    for level in info.levels:
        if (
            any(have < need for have, need in zip(pck.tcb_components, level.sgx_components))
            or pck.pce_svn < level.pce_svn
        ):
            continue
        if td is not None:
            if level.tdx_components is None:
                continue
            # With a TDX module of major version >= 1, components 0 and 1 are judged
            # through the TDX module identity instead.
            start = 2 if td.tee_tcb_svn[1] > 0 and info.tdx_module_identities else 0
            if any(td.tee_tcb_svn[i] < level.tdx_components[i] for i in range(start, 16)):
                continue
        return level
    raise VerificationError(
        f"{kind}: platform TCB matches no TCB level in the TCB info (FMSPC {info.fmspc.hex().upper()})",
        "the platform's TCB is older than any Intel still lists: update its microcode/firmware (TCB recovery)",
    )


def tdx_module_level(info: TcbInfo, td: TdReport, kind: str) -> IsvLevel | None:
    """Check the SEAM module's signer and attributes; its level when identities are given."""
    major, minor = td.tee_tcb_svn[1], td.tee_tcb_svn[0]
    if major > 0 and info.tdx_module_identities:
        ident_id = f"TDX_{major:02X}"
        ident = next((m for m in info.tdx_module_identities if m.id == ident_id), None)
        if ident is None:
            raise VerificationError(f"{kind}: TCB info has no TDX module identity {ident_id}")
    elif info.tdx_module is not None:
        ident = info.tdx_module
    else:
        raise VerificationError(f"{kind}: TCB info has no TDX module identity")
    if td.mr_signer_seam != ident.mrsigner:
        raise VerificationError(f"{kind}: TDX module MRSIGNER does not match the TCB info")
    if _and(td.seam_attributes, ident.attributes_mask) != _and(ident.attributes, ident.attributes_mask):
        raise VerificationError(f"{kind}: TDX module attributes do not match the TCB info")
    if not ident.levels:
        return None
    for level in ident.levels:
        if minor >= level.isv_svn:
            return level
    raise VerificationError(f"{kind}: TDX module SVN {minor} matches no level of identity {ident.id}")


def qe_level(identity: QeIdentity, qe: EnclaveReport, kind: str) -> IsvLevel:
    """Check the QE against its identity and return its TCB level."""
    if qe.mr_signer != identity.mrsigner:
        raise VerificationError(f"{kind}: QE MRSIGNER does not match the QE identity")
    if qe.isv_prod_id != identity.isv_prod_id:
        raise VerificationError(
            f"{kind}: QE ISVPRODID {qe.isv_prod_id} does not match the QE identity's {identity.isv_prod_id}"
        )
    if qe.misc_select & identity.miscselect_mask != identity.miscselect & identity.miscselect_mask:
        raise VerificationError(f"{kind}: QE MISCSELECT does not match the QE identity")
    if _and(qe.attributes, identity.attributes_mask) != _and(identity.attributes, identity.attributes_mask):
        raise VerificationError(f"{kind}: QE attributes do not match the QE identity")
    for level in identity.levels:
        if qe.isv_svn >= level.isv_svn:
            return level
    raise VerificationError(f"{kind}: QE ISVSVN {qe.isv_svn} matches no level of the QE identity")


def _fold(status: str, other: str) -> str:
    """Degrade ``status`` by a QE or TDX-module status (Intel's convergence rule)."""
    if other == "Revoked" or status == "Revoked":
        return "Revoked"
    if other == "OutOfDate":
        if status in ("UpToDate", "SWHardeningNeeded", "OutOfDate"):
            return "OutOfDate"
        return "OutOfDateConfigurationNeeded"
    return status


def appraise(
    info: TcbInfo, identity: QeIdentity, pck: PckExtension, qe: EnclaveReport, td: TdReport | None, kind: str
) -> TcbVerdict:
    """The combined TCB status; a Revoked result is a rejection."""
    level = platform_level(info, pck, td, kind)
    qe_lv = qe_level(identity, qe, kind)
    status, advisories = level.status, list(level.advisory_ids)
    module_status = None
    if td is not None:
        mod = tdx_module_level(info, td, kind)
        if mod is not None:
            module_status = mod.status
            status = _fold(status, mod.status)
            advisories += mod.advisory_ids
    status = _fold(status, qe_lv.status)
    advisories += qe_lv.advisory_ids
    if status == "Revoked":
        raise VerificationError(f"{kind}: platform TCB is Revoked", ", ".join(dict.fromkeys(advisories)) or None)
    return TcbVerdict(
        status,
        tuple(dict.fromkeys(advisories)),
        level.tcb_date.strftime("%Y-%m-%dT%H:%M:%SZ"),
        level.status,
        qe_lv.status,
        module_status,
    )
