"""Parser for Intel DCAP ECDSA quotes: SGX v3/v4/v5 and TDX v4/v5.

Splits a quote into its header, enclave or TD report body and ECDSA
signature data (QE report, its signature, auth data and the PCK chain from
certification data type 5, nested in type 6 from v4 on), keeping the exact
bytes each signature covers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cove.attest._reader import Reader
from cove.attest.errors import VerificationError

TEE_SGX, TEE_TDX = 0x00000000, 0x00000081
ATT_KEY_ECDSA_P256 = 2
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
CERT_PCK_CHAIN, CERT_QE_REPORT = 5, 6
_PEM_CHAIN = re.compile(rb"(\s*-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----)+\s*")
SGX_REPORT_SIZE, TD10_SIZE, TD15_SIZE = 384, 584, 648


@dataclass(frozen=True)
class QuoteHeader:
    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True)
class SgxAttributes:
    debug: bool
    mode64bit: bool
    provision_key: bool
    einit_token_key: bool
    kss: bool
    flags: int
    xfrm: int


@dataclass(frozen=True)
class EnclaveReport:
    """An SGX REPORT_BODY: the enclave in a SGX quote, or the QE itself."""

    cpu_svn: bytes
    misc_select: int
    isv_ext_prod_id: bytes
    attributes: bytes
    attributes_decoded: SgxAttributes
    mr_enclave: bytes
    mr_signer: bytes
    config_id: bytes
    isv_prod_id: int
    isv_svn: int
    config_svn: int
    isv_family_id: bytes
    report_data: bytes
    raw: bytes


@dataclass(frozen=True)
class TdAttributes:
    debug: bool
    sept_ve_disable: bool
    pks: bool
    kl: bool
    perfmon: bool
    raw: int


@dataclass(frozen=True)
class TdReport:
    """A TD report body, version 1.0 (TDX 1.0) or 1.5 (adds tee_tcb_svn2, mr_servicetd)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    td_attributes_decoded: TdAttributes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None
    mr_service_td: bytes | None


@dataclass(frozen=True)
class QeReportCertData:
    """The QE's own report, its signature by the PCK key, auth data and the PCK chain."""

    qe_report: EnclaveReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes


@dataclass(frozen=True)
class DcapQuote:
    header: QuoteHeader
    body: EnclaveReport | TdReport
    signature: bytes  # r || s, 64 bytes
    attestation_key: bytes  # x || y, 64 bytes
    cert: QeReportCertData
    signed_bytes: bytes  # what the attestation key signed

    @property
    def is_tdx(self) -> bool:
        return self.header.tee_type == TEE_TDX


def parse_enclave_report(raw: bytes, kind: str) -> EnclaveReport:
    r = Reader(raw, kind, big_endian=False)
    cpu_svn = r.take(16, "cpu_svn")
    misc = r.u32("misc_select")
    r.take(12, "reserved")
    ext_prod = r.take(16, "isv_ext_prod_id")
    attrs = r.take(16, "attributes")
    mr_enclave = r.take(32, "mr_enclave")
    r.take(32, "reserved")
    mr_signer = r.take(32, "mr_signer")
    r.take(32, "reserved")
    config_id = r.take(64, "config_id")
    prod, svn, csvn = r.u16("isv_prod_id"), r.u16("isv_svn"), r.u16("config_svn")
    r.take(42, "reserved")
    family = r.take(16, "isv_family_id")
    report_data = r.take(64, "report_data")
    r.end("report body")
    flags = int.from_bytes(attrs[:8], "little")
    decoded = SgxAttributes(
        debug=bool(flags & 2),
        mode64bit=bool(flags & 4),
        provision_key=bool(flags & 16),
        einit_token_key=bool(flags & 32),
        kss=bool(flags & 128),
        flags=flags,
        xfrm=int.from_bytes(attrs[8:], "little"),
    )
    return EnclaveReport(
        cpu_svn,
        misc,
        ext_prod,
        attrs,
        decoded,
        mr_enclave,
        mr_signer,
        config_id,
        prod,
        svn,
        csvn,
        family,
        report_data,
        raw,
    )


def parse_td_report(raw: bytes, kind: str) -> TdReport:
    r = Reader(raw, kind, big_endian=False)
    f = r.take
    tee_tcb_svn, mr_seam, mr_signer_seam = f(16, "tee_tcb_svn"), f(48, "mr_seam"), f(48, "mr_signer_seam")
    seam_attrs, td_attrs, xfam = f(8, "seam_attributes"), f(8, "td_attributes"), f(8, "xfam")
    mr_td, cfg, owner, owner_cfg = f(48, "mr_td"), f(48, "mr_config_id"), f(48, "mr_owner"), f(48, "mr_owner_config")
    rtmrs = (f(48, "rtmr0"), f(48, "rtmr1"), f(48, "rtmr2"), f(48, "rtmr3"))
    report_data = f(64, "report_data")
    svn2 = mr_service = None
    if len(raw) == TD15_SIZE:
        svn2, mr_service = f(16, "tee_tcb_svn2"), f(48, "mr_servicetd")
    r.end("TD report body")
    v = int.from_bytes(td_attrs, "little")
    decoded = TdAttributes(bool(v & 1), bool(v >> 28 & 1), bool(v >> 30 & 1), bool(v >> 31 & 1), bool(v >> 63 & 1), v)
    return TdReport(
        tee_tcb_svn,
        mr_seam,
        mr_signer_seam,
        seam_attrs,
        td_attrs,
        decoded,
        xfam,
        mr_td,
        cfg,
        owner,
        owner_cfg,
        rtmrs,
        report_data,
        svn2,
        mr_service,
    )


def _pck_chain(r: Reader, kind: str) -> bytes:
    ctype = r.u16("certification data type")
    data = r.sized(4, "certification data")
    if ctype != CERT_PCK_CHAIN:
        raise VerificationError(f"{kind}: certification data type {ctype} is not a PCK chain (5)")
    pem = data.rstrip(b"\x00")
    if not _PEM_CHAIN.fullmatch(pem):
        raise VerificationError(f"{kind}: PCK certificate chain holds data outside its PEM blocks")
    return pem


def _qe_cert_data(body: bytes, kind: str) -> QeReportCertData:
    r = Reader(body, kind, big_endian=False)
    qe_report = parse_enclave_report(r.take(SGX_REPORT_SIZE, "QE report"), kind)
    qe_sig = r.take(64, "QE report signature")
    auth = r.sized(2, "QE auth data")
    chain = _pck_chain(r, kind)
    r.end("QE certification data")
    return QeReportCertData(qe_report, qe_sig, auth, chain)


def parse_dcap_quote(data: bytes) -> DcapQuote:
    """Parse an SGX or TDX ECDSA quote; the kind in errors follows the TEE type."""
    r = Reader(data, "dcap", big_endian=False)
    version, key_type, tee = r.u16("version"), r.u16("attestation key type"), r.u32("tee type")
    kind = {TEE_SGX: "sgx", TEE_TDX: "tdx"}.get(tee)
    if kind is None:
        raise VerificationError(f"dcap: unknown TEE type 0x{tee:08x}")
    r.kind = kind
    header = QuoteHeader(
        version, key_type, tee, r.u16("qe_svn"), r.u16("pce_svn"), r.take(16, "qe_vendor_id"), r.take(20, "user_data")
    )
    if version not in (3, 4, 5) or (kind == "tdx" and version == 3):
        raise VerificationError(f"{kind}: quote version {version} not supported")
    if key_type != ATT_KEY_ECDSA_P256:
        raise VerificationError(f"{kind}: attestation key type {key_type} is not ECDSA P-256")
    if header.qe_vendor_id != INTEL_QE_VENDOR_ID:
        raise VerificationError(f"{kind}: QE vendor id {header.qe_vendor_id.hex()} is not Intel's")
    if version == 5:
        body_type = r.u16("body type")
        body_size = r.u32("body size")
        expected = {1: SGX_REPORT_SIZE, 2: TD10_SIZE, 3: TD15_SIZE}.get(body_type)
        if expected is None or expected != body_size or (body_type == 1) != (kind == "sgx"):
            raise VerificationError(f"{kind}: quote body type {body_type} of size {body_size} is not valid")
    else:
        body_size = SGX_REPORT_SIZE if kind == "sgx" else TD10_SIZE
    raw_body = r.take(body_size, "report body")
    signed = r.data[: r.pos]
    body = parse_enclave_report(raw_body, kind) if kind == "sgx" else parse_td_report(raw_body, kind)
    sig_data = r.sized(4, "signature data")
    # Quotes fetched into fixed buffers may carry zero padding; nothing else may follow.
    if any(r.take(r.remaining(), "padding")):
        raise VerificationError(f"{kind}: non-zero bytes after the quote's signature data")
    s = Reader(sig_data, kind, big_endian=False)
    signature, att_key = s.take(64, "quote signature"), s.take(64, "attestation key")
    if version == 3:
        cert = _qe_cert_data(sig_data[s.pos :], kind)
    else:
        ctype = s.u16("certification data type")
        inner = s.sized(4, "certification data")
        s.end("signature data")
        if ctype != CERT_QE_REPORT:
            raise VerificationError(f"{kind}: certification data type {ctype} is not QE report data (6)")
        cert = _qe_cert_data(inner, kind)
    return DcapQuote(header, body, signature, att_key, cert, signed)
