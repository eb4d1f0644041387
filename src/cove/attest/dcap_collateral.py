"""Intel PCS collateral for DCAP quotes: TCB info, QE identity, CRLs, chains.

Parsed once into frozen dataclasses (so a verifier can keep it warm); the raw
JSON bytes are kept because Intel signs them exactly as served.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from cryptography import x509

from cove.attest._cbor import rejection
from cove.attest._x509 import PARSE_ERRORS, load_pem_chain
from cove.attest.errors import VerificationError
from cove.decode import Fields, decode_json

TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
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


COLLATERAL_LIMIT = 1 << 22  # PCS collateral with its CRLs and chains is tens of KiB


def _load_json(raw: str | bytes, kind: str, what: str) -> tuple[Fields, bytes]:
    """A signed JSON body as fields, and its exact bytes (Intel signs them as served)."""
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    error = rejection(kind)
    return Fields(decode_json(data, error, what, limit=COLLATERAL_LIMIT), what, error), data


def _svn(f: Fields, key: str) -> int:
    return f.integer(key, 0, 0xFFFF)


def _date(f: Fields, key: str) -> datetime:
    text = f.text(key)
    try:
        t: datetime | None = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        t = None
    if t is None or t.tzinfo is None:
        raise f.fail(key, "is not an ISO 8601 UTC time")
    return t.astimezone(timezone.utc)


def _advisories(f: Fields) -> tuple[str, ...]:
    ids = f.list("advisoryIDs", default=())
    if not all(isinstance(i, str) for i in ids):
        raise f.fail("advisoryIDs", "must hold text strings")
    return tuple(str(i) for i in ids)


def _isv_levels(f: Fields) -> tuple[IsvLevel, ...]:
    return tuple(
        IsvLevel(
            _svn(lv.sub("tcb"), "isvsvn"), _date(lv, "tcbDate"), lv.text("tcbStatus", TCB_STATUSES), _advisories(lv)
        )
        for lv in f.maps("tcbLevels", min_items=1)
    )


def _components(tcb: Fields, key: str) -> tuple[int, ...]:
    return tuple(_svn(c, "svn") for c in tcb.maps(key, min_items=16, max_items=16))


def _tcb_level(lv: Fields, version: int, tdx: bool) -> TcbLevel:
    tcb = lv.sub("tcb")
    if version >= 3:
        sgx = _components(tcb, "sgxtcbcomponents")
        tdx_c = _components(tcb, "tdxtcbcomponents") if tdx else None
    else:
        sgx = tuple(_svn(tcb, f"sgxtcbcomp{i:02d}svn") for i in range(1, 17))
        tdx_c = None
    return TcbLevel(
        sgx, _svn(tcb, "pcesvn"), tdx_c, _date(lv, "tcbDate"), lv.text("tcbStatus", TCB_STATUSES), _advisories(lv)
    )


def _module(m: Fields, levels: bool) -> TdxModuleIdentity:
    return TdxModuleIdentity(
        id=m.text("id") if levels else "",
        mrsigner=m.hex("mrsigner", 48),
        attributes=m.hex("attributes", 8),
        attributes_mask=m.hex("attributesMask", 8),
        levels=_isv_levels(m) if levels else (),
    )


def parse_tcb_info(raw: str | bytes, kind: str = "dcap") -> TcbInfo:
    """Parse a TCB info JSON body (the value Intel signs), version 2 or 3."""
    d, data = _load_json(raw, kind, "TCB info")
    tid, version = d.text("id", default="SGX"), d.integer("version")
    if tid not in ("SGX", "TDX") or version not in (2, 3) or (tid == "TDX" and version != 3):
        raise d.error(f"TCB info id {tid[:40]!r} version {version} is not supported")
    tdx = tid == "TDX"
    module = d.sub("tdxModule", optional=True)
    return TcbInfo(
        id=tid,
        version=version,
        issue_date=_date(d, "issueDate"),
        next_update=_date(d, "nextUpdate"),
        fmspc=d.hex("fmspc", 6),
        pce_id=d.hex("pceId", 2),
        tcb_type=d.integer("tcbType", default=0),
        evaluation_data_number=d.integer("tcbEvaluationDataNumber", default=0),
        levels=tuple(_tcb_level(lv, version, tdx) for lv in d.maps("tcbLevels", min_items=1)),
        tdx_module=_module(module, False) if module is not None else None,
        tdx_module_identities=tuple(_module(m, True) for m in d.maps("tdxModuleIdentities", default=())),
        raw=data,
    )


def parse_qe_identity(raw: str | bytes, kind: str = "dcap") -> QeIdentity:
    """Parse an enclave identity JSON body (QE or TD_QE), version 2."""
    d, data = _load_json(raw, kind, "QE identity")
    qid, version = d.text("id"), d.integer("version")
    if qid not in ("QE", "TD_QE") or version != 2:
        raise d.error(f"QE identity id {qid[:40]!r} version {version} is not supported")
    return QeIdentity(
        id=qid,
        version=version,
        issue_date=_date(d, "issueDate"),
        next_update=_date(d, "nextUpdate"),
        evaluation_data_number=d.integer("tcbEvaluationDataNumber", default=0),
        miscselect=int.from_bytes(d.hex("miscselect", 4), "big"),
        miscselect_mask=int.from_bytes(d.hex("miscselectMask", 4), "big"),
        attributes=d.hex("attributes", 16),
        attributes_mask=d.hex("attributesMask", 16),
        mrsigner=d.hex("mrsigner", 32),
        isv_prod_id=_svn(d, "isvprodid"),
        levels=_isv_levels(d),
        raw=data,
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
    except PARSE_ERRORS as exc:  # a malformed CRL from untrusted input is a rejection
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


def parse_collateral(obj: str | bytes | dict[str, object], kind: str = "dcap") -> DcapCollateral:
    """Parse collateral in the PCS JSON shape (CRLs hex DER, chains PEM, bodies JSON text)."""
    error = rejection(kind)
    value: object = obj
    if isinstance(obj, (str, bytes, bytearray)):
        value = decode_json(obj if isinstance(obj, str) else bytes(obj), error, "collateral", limit=COLLATERAL_LIMIT)
    f = Fields(value, "collateral", error)

    def text(key: str) -> str | bytes:
        found = f.value(key, (str, bytes))
        return found if isinstance(found, (str, bytes)) else str(found)  # narrowed for the type checker

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
