"""Intel PCS collateral for DCAP quotes: TCB info, QE identity, CRLs, chains.

Parsed once into frozen dataclasses (so a verifier can keep it warm); the raw
JSON bytes are kept because Intel signs them exactly as served.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from cryptography import x509

from cove.attest._x509 import load_pem_chain
from cove.attest.errors import VerificationError

TCB_STATUSES = (
    "UpToDate", "SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded",
    "OutOfDate", "OutOfDateConfigurationNeeded", "Revoked",
)


@dataclass(frozen=True)
class TcbLevel:
    sgx_components: tuple[int, ...]
    pce_svn: int
    tdx_components: tuple[int, ...] | None
    tcb_date: datetime
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class IsvLevel:
    """A TCB level keyed by one ISV SVN (QE identity, TDX module identity)."""

    isv_svn: int
    tcb_date: datetime
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class TdxModuleIdentity:
    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    levels: tuple[IsvLevel, ...]


@dataclass(frozen=True)
class TcbInfo:
    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    tcb_type: int
    evaluation_data_number: int
    levels: tuple[TcbLevel, ...]
    tdx_module: TdxModuleIdentity | None
    tdx_module_identities: tuple[TdxModuleIdentity, ...]
    raw: bytes


@dataclass(frozen=True)
class QeIdentity:
    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    evaluation_data_number: int
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isv_prod_id: int
    levels: tuple[IsvLevel, ...]
    raw: bytes


@dataclass(frozen=True)
class DcapCollateral:
    tcb_info: TcbInfo
    tcb_info_signature: bytes
    tcb_info_chain: tuple[x509.Certificate, ...]
    qe_identity: QeIdentity
    qe_identity_signature: bytes
    qe_identity_chain: tuple[x509.Certificate, ...]
    pck_crl: x509.CertificateRevocationList
    root_ca_crl: x509.CertificateRevocationList
    pck_crl_chain: tuple[x509.Certificate, ...]


class _J:
    """Typed access to untrusted JSON; every mismatch is a VerificationError."""

    def __init__(self, kind: str, what: str):
        self.kind, self.what = kind, what

    def fail(self, msg: str):
        raise VerificationError(f"{self.kind}: {self.what} {msg}")

    def get(self, d: Any, key: str, typ: type | tuple, default: Any = ...):
        if not isinstance(d, dict):
            self.fail("is not a JSON object where one is expected")
        if key not in d:
            if default is not ...:
                return default
            self.fail(f"lacks field {key!r}")
        v = d[key]
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            self.fail(f"field {key!r} has the wrong type")
        return v

    def svn(self, d: Any, key: str) -> int:
        v = self.get(d, key, int)
        if not 0 <= v <= 0xFFFF:
            self.fail(f"field {key!r} is out of range")
        return v

    def hexbytes(self, d: Any, key: str, size: int | None = None) -> bytes:
        try:
            v = bytes.fromhex(self.get(d, key, str))
        except ValueError:
            self.fail(f"field {key!r} is not hex")
        if size is not None and len(v) != size:
            self.fail(f"field {key!r} is not {size} bytes")
        return v

    def date(self, d: Any, key: str) -> datetime:
        s = self.get(d, key, str)
        try:
            t = datetime.fromisoformat(s.replace("Z", "+00:00"))
        except ValueError:
            t = None
        if t is None or t.tzinfo is None:
            self.fail(f"field {key!r} is not an ISO 8601 UTC time")
        return t.astimezone(timezone.utc)

    def status(self, d: Any) -> str:
        s = self.get(d, "tcbStatus", str)
        if s not in TCB_STATUSES:
            self.fail(f"has unknown TCB status {s!r}")
        return s

    def advisories(self, d: Any) -> tuple[str, ...]:
        ids = self.get(d, "advisoryIDs", list, [])
        if not all(isinstance(i, str) for i in ids):
            self.fail("advisoryIDs are not strings")
        return tuple(ids)


def _load_json(raw: str | bytes, j: _J) -> tuple[dict, bytes]:
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        j.fail("is not valid JSON")
    if not isinstance(obj, dict):
        j.fail("is not a JSON object")
    return obj, data


def _isv_levels(j: _J, items: Any) -> tuple[IsvLevel, ...]:
    if not isinstance(items, list) or not items:
        j.fail("has no TCB levels")
    return tuple(
        IsvLevel(j.svn(j.get(lv, "tcb", dict), "isvsvn"), j.date(lv, "tcbDate"), j.status(lv), j.advisories(lv))
        for lv in items
    )


def _components(j: _J, tcb: dict, key: str) -> tuple[int, ...]:
    comps = j.get(tcb, key, list)
    if len(comps) != 16:
        j.fail(f"{key} does not hold 16 components")
    return tuple(j.svn(c, "svn") for c in comps)


def _tcb_level(j: _J, lv: Any, version: int, tdx: bool) -> TcbLevel:
    tcb = j.get(lv, "tcb", dict)
    if version >= 3:
        sgx = _components(j, tcb, "sgxtcbcomponents")
        tdx_c = _components(j, tcb, "tdxtcbcomponents") if tdx else None
    else:
        sgx = tuple(j.svn(tcb, f"sgxtcbcomp{i:02d}svn") for i in range(1, 17))
        tdx_c = None
    return TcbLevel(sgx, j.svn(tcb, "pcesvn"), tdx_c, j.date(lv, "tcbDate"), j.status(lv), j.advisories(lv))


def _module(j: _J, m: Any, levels: bool) -> TdxModuleIdentity:
    return TdxModuleIdentity(
        id=j.get(m, "id", str) if levels else "",
        mrsigner=j.hexbytes(m, "mrsigner", 48),
        attributes=j.hexbytes(m, "attributes", 8),
        attributes_mask=j.hexbytes(m, "attributesMask", 8),
        levels=_isv_levels(j, j.get(m, "tcbLevels", list)) if levels else (),
    )


def parse_tcb_info(raw: str | bytes, kind: str = "dcap") -> TcbInfo:
    """Parse a TCB info JSON body (the value Intel signs), version 2 or 3."""
    j = _J(kind, "TCB info")
    d, data = _load_json(raw, j)
    tid = j.get(d, "id", str, "SGX")
    version = j.get(d, "version", int)
    if tid not in ("SGX", "TDX") or version not in (2, 3) or (tid == "TDX" and version != 3):
        j.fail(f"id {tid!r} version {version} is not supported")
    tdx = tid == "TDX"
    levels = j.get(d, "tcbLevels", list)
    if not levels:
        j.fail("has no TCB levels")
    module = j.get(d, "tdxModule", dict, None)
    idents = j.get(d, "tdxModuleIdentities", list, [])
    return TcbInfo(
        id=tid, version=version, issue_date=j.date(d, "issueDate"), next_update=j.date(d, "nextUpdate"),
        fmspc=j.hexbytes(d, "fmspc", 6), pce_id=j.hexbytes(d, "pceId", 2),
        tcb_type=j.get(d, "tcbType", int, 0), evaluation_data_number=j.get(d, "tcbEvaluationDataNumber", int, 0),
        levels=tuple(_tcb_level(j, lv, version, tdx) for lv in levels),
        tdx_module=_module(j, module, False) if module is not None else None,
        tdx_module_identities=tuple(_module(j, m, True) for m in idents),
        raw=data,
    )


def parse_qe_identity(raw: str | bytes, kind: str = "dcap") -> QeIdentity:
    """Parse an enclave identity JSON body (QE or TD_QE), version 2."""
    j = _J(kind, "QE identity")
    d, data = _load_json(raw, j)
    qid, version = j.get(d, "id", str), j.get(d, "version", int)
    if qid not in ("QE", "TD_QE") or version != 2:
        j.fail(f"id {qid!r} version {version} is not supported")
    return QeIdentity(
        id=qid, version=version, issue_date=j.date(d, "issueDate"), next_update=j.date(d, "nextUpdate"),
        evaluation_data_number=j.get(d, "tcbEvaluationDataNumber", int, 0),
        miscselect=int.from_bytes(j.hexbytes(d, "miscselect", 4), "big"),
        miscselect_mask=int.from_bytes(j.hexbytes(d, "miscselectMask", 4), "big"),
        attributes=j.hexbytes(d, "attributes", 16), attributes_mask=j.hexbytes(d, "attributesMask", 16),
        mrsigner=j.hexbytes(d, "mrsigner", 32), isv_prod_id=j.svn(d, "isvprodid"),
        levels=_isv_levels(j, j.get(d, "tcbLevels", list)), raw=data,
    )


def load_crl(der_or_hex: bytes | str, kind: str, what: str) -> x509.CertificateRevocationList:
    """A DER CRL (hex text accepted, as in the PCS JSON), all fields parsed now."""
    try:
        raw = bytes.fromhex(der_or_hex) if isinstance(der_or_hex, str) else bytes(der_or_hex)
        crl = x509.load_der_x509_crl(raw)
        crl.issuer.rfc4514_string()
        _ = crl.last_update_utc, crl.next_update_utc, crl.signature_hash_algorithm, list(crl.extensions)
        for entry in crl:
            _ = entry.serial_number, entry.revocation_date_utc
    except Exception as exc:  # any parse failure of untrusted input is a rejection
        raise VerificationError(f"{kind}: {what} is not a valid DER CRL ({exc})") from None
    return crl


def _signature(hex_text: Any, kind: str, what: str) -> bytes:
    try:
        sig = bytes.fromhex(hex_text) if isinstance(hex_text, str) else bytes(hex_text)
    except (ValueError, TypeError):
        sig = b""
    if len(sig) != 64:
        raise VerificationError(f"{kind}: {what} signature is not 64 bytes of r||s")
    return sig


def parse_collateral(obj: str | bytes | dict, kind: str = "dcap") -> DcapCollateral:
    """Parse collateral in the PCS JSON shape (CRLs hex DER, chains PEM, bodies JSON text)."""
    j = _J(kind, "collateral")
    if isinstance(obj, (str, bytes, bytearray)):
        obj, _ = _load_json(obj, j)
    if not isinstance(obj, dict):
        j.fail("is not a JSON object")
    text = lambda k: j.get(obj, k, (str, bytes))  # noqa: E731
    return DcapCollateral(
        tcb_info=parse_tcb_info(text("tcb_info"), kind),
        tcb_info_signature=_signature(text("tcb_info_signature"), kind, "TCB info"),
        tcb_info_chain=tuple(load_pem_chain(text("tcb_info_issuer_chain"), kind, "TCB info issuer chain")),
        qe_identity=parse_qe_identity(text("qe_identity"), kind),
        qe_identity_signature=_signature(text("qe_identity_signature"), kind, "QE identity"),
        qe_identity_chain=tuple(load_pem_chain(text("qe_identity_issuer_chain"), kind, "QE identity issuer chain")),
        pck_crl=load_crl(text("pck_crl"), kind, "PCK CRL"),
        root_ca_crl=load_crl(text("root_ca_crl"), kind, "root CA CRL"),
        pck_crl_chain=tuple(load_pem_chain(text("pck_crl_issuer_chain"), kind, "PCK CRL issuer chain")),
    )
