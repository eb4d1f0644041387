"""Verify an AMD SEV-SNP attestation report against its VCEK or VLEK.

Checks the report signature (ECDSA P-384, SHA-384) with the endorsement key,
the key's chain to the AMD root key (RSA-PSS, SHA-384), validity windows at a
given time, and that the certificate was issued for the reported TCB and chip.

AMD's chains have one shape: ARK -> ASK -> VCEK, or ARK -> ASVK -> VLEK (the
ASVK signs the VLEKs AMD issues to cloud providers). A trusted bundle may hold
any of these CAs, for one product or several (AMD publishes ASK, ARK and ASVK
per product); the issuer of the endorsement key and its ARK are picked from
it by name, and the chain is checked as a whole.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cove.attest._keys import verify_ecdsa
from cove.attest._x509 import check_chain, load_der_cert, load_pem_chain, utc
from cove.attest.errors import VerificationError
from cove.attest.snp_report import PRODUCTS, SnpReport, TcbVersion, parse_snp_report

_AMD = "1.3.6.1.4.1.3704.1."
OID_PRODUCT = _AMD + "2"
OID_BL, OID_TEE, OID_SNP, OID_UCODE, OID_FMC = (_AMD + f"3.{n}" for n in (1, 2, 3, 8, 9))
OID_HWID = _AMD + "4"
OID_CSP_ID = _AMD + "5"


MAX_BUNDLE = 16  # certificates in a trusted AMD bundle
# AMD's chain shapes, leaf first (common names).
SHAPES = {
    "vcek": ("SEV-VCEK", r"SEV-(?!VLEK)[A-Za-z0-9]+", r"ARK-[A-Za-z0-9]+"),
    "vlek": ("SEV-VLEK", r"SEV-VLEK-[A-Za-z0-9]+", r"ARK-[A-Za-z0-9]+"),
}


@dataclass(frozen=True)
class EndorsementKeyInfo:
    """What AMD's certificate says about the key that signed the report."""

    kind: str  # "vcek" or "vlek"
    product: str | None
    tcb: dict[str, int]
    hwid: bytes | None
    csp_id: str | None
    not_after: datetime


@dataclass(frozen=True)
class SnpClaims:
    """A verified report and the endorsement behind it."""

    report: SnpReport
    product: str
    signing_key: str
    endorsement: EndorsementKeyInfo
    measurement: bytes
    report_data: bytes
    host_data: bytes
    debug_allowed: bool


def _der_value(raw: bytes) -> tuple[int, bytes]:
    """Tag and content of one short DER TLV (extension values are small)."""
    if len(raw) < 2:
        raise VerificationError("snp: truncated certificate extension")
    tag, length = raw[0], raw[1]
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 2 or len(raw) < 2 + n:
            raise VerificationError("snp: malformed certificate extension length")
        length, body = int.from_bytes(raw[2 : 2 + n], "big"), raw[2 + n :]
    else:
        body = raw[2:]
    if len(body) != length:
        raise VerificationError("snp: certificate extension length mismatch")
    return tag, body


def endorsement_info(cert: x509.Certificate) -> EndorsementKeyInfo:
    """Decode AMD's extensions (TCB SPLs, hwID or CSP id, product) from a VCEK/VLEK."""
    exts: dict[str, bytes] = {}
    for ext in cert.extensions:
        if ext.oid.dotted_string.startswith(_AMD) and isinstance(ext.value, x509.UnrecognizedExtension):
            exts[ext.oid.dotted_string] = ext.value.value

    def integer(oid: str, name: str) -> int | None:
        if oid not in exts:
            return None
        tag, body = _der_value(exts[oid])
        if tag != 0x02 or not body or len(body) > 2:
            raise VerificationError(f"snp: certificate {name} SPL is not a small INTEGER")
        return int.from_bytes(body, "big", signed=True)

    def text(oid: str) -> str | None:
        if oid not in exts:
            return None
        tag, body = _der_value(exts[oid])
        if tag not in (0x16, 0x0C, 0x13):
            raise VerificationError("snp: certificate string extension has an unexpected type")
        return body.decode("ascii", "replace")

    tcb = {}
    for oid, name in (
        (OID_BL, "bootloader"),
        (OID_TEE, "tee"),
        (OID_SNP, "snp"),
        (OID_UCODE, "microcode"),
        (OID_FMC, "fmc"),
    ):
        v = integer(oid, name)
        if v is not None:
            tcb[name] = v
    hwid = exts.get(OID_HWID)
    csp = text(OID_CSP_ID)
    if hwid is not None and csp is not None:
        raise VerificationError("snp: endorsement certificate carries both a hwID and a CSP id")
    kind = "vlek" if csp is not None else "vcek"
    if kind == "vcek" and hwid is None:
        raise VerificationError("snp: VCEK certificate has no hwID extension")
    for name in ("bootloader", "tee", "snp", "microcode"):
        if name not in tcb:
            raise VerificationError(f"snp: endorsement certificate lacks the {name} SPL extension")
    return EndorsementKeyInfo(kind, text(OID_PRODUCT), tcb, hwid, csp, cert.not_valid_after_utc)


def _product_of(info: EndorsementKeyInfo, chain: list[x509.Certificate]) -> str | None:
    names = [info.product or ""] + [c.subject.rfc4514_string() for c in chain]
    for prod in PRODUCTS:
        if any(prod in n for n in names):
            return prod
    return None


def _check_tcb(reported: TcbVersion, info: EndorsementKeyInfo) -> None:
    pairs = [
        ("bootloader", reported.bootloader),
        ("tee", reported.tee),
        ("snp", reported.snp),
        ("microcode", reported.microcode),
    ]
    if reported.fmc is not None:
        pairs.append(("fmc", reported.fmc))
    for name, value in pairs:
        if name in info.tcb and info.tcb[name] != value:
            raise VerificationError(
                f"snp: reported TCB {name} SPL {value} does not match the {info.kind.upper()}'s {info.tcb[name]}",
                "fetch the endorsement certificate issued for this report's reported_tcb",
            )


def _cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _issuers(
    cert: x509.Certificate, bundle: list[x509.Certificate], kind: str
) -> tuple[x509.Certificate, x509.Certificate]:
    """The ASK (VCEK) or ASVK (VLEK) that issued ``cert``, and the ARK that issued that, from a trusted bundle."""
    signer = "ASVK" if kind == "vlek" else "ASK"
    middles = [c for c in bundle if c.subject == cert.issuer and c.subject != c.issuer]
    if not middles:
        names = ", ".join(_cn(c) for c in bundle)
        hint = (
            "use AMD's bundle for the product with the ASVK (ASK, ARK and ASVK), or the built-in roots"
            if kind == "vlek"
            else "use the ASK/ARK chain of the VCEK's product, or the built-in roots"
        )
        issuer = cert.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        issuer_name = str(issuer[0].value) if issuer else cert.issuer.rfc4514_string()[:120]
        raise VerificationError(
            f"snp: the {kind.upper()}'s issuer {issuer_name} is not in the trusted AMD chain "
            f"({names}): a {kind.upper()} needs its product's {signer}",
            hint,
        )
    problem: x509.Certificate | None = None
    for middle in middles:
        for ark in (c for c in bundle if c.subject == middle.issuer and c.subject == c.issuer):
            return middle, ark
        problem = middle
    where = problem.subject.rfc4514_string()[:120] if problem is not None else "its ASK or ASVK"
    raise VerificationError(f"snp: the trusted AMD chain holds no ARK for {where}")


def verify_snp_report(
    report: bytes,
    vcek: bytes,
    ask_ark: bytes | str,
    now: datetime,
    *,
    product: str | None = None,
) -> SnpClaims:
    """Verify ``report`` with its VCEK/VLEK (DER) and a trusted AMD bundle (PEM: ASK and/or ASVK, and ARK).

    The bundle is the trust anchor: take it from a trusted store (AMD's
    published roots), never from the party being attested.
    """
    now = utc(now, "snp")
    cert = load_der_cert(vcek, "snp", "endorsement key certificate")
    bundle = load_pem_chain(ask_ark, "snp", "ASK/ARK chain")
    if len(bundle) > MAX_BUNDLE:
        raise VerificationError(f"snp: the trusted AMD bundle holds {len(bundle)} certificates, more than {MAX_BUNDLE}")
    info = endorsement_info(cert)
    middle, ark = _issuers(cert, bundle, info.kind)
    chain = [middle, ark]
    prod = product or _product_of(info, chain)
    parsed = parse_snp_report(report, prod)
    if parsed.signing_key == "none":
        raise VerificationError("snp: report is unsigned (signing key 'none')")
    if parsed.signing_key != info.kind:
        raise VerificationError(
            f"snp: report is signed by a {parsed.signing_key.upper()} but a {info.kind.upper()} was given"
        )
    check_chain([cert, middle, ark], ark, now, "snp", SHAPES[info.kind], info.kind.upper())
    if _cn(middle).rsplit("-", 1)[-1] != _cn(ark).rsplit("-", 1)[-1]:
        raise VerificationError(f"snp: {_cn(middle)} and {_cn(ark)} are for different products")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise VerificationError("snp: endorsement key is not an ECDSA P-384 key")
    verify_ecdsa(
        key,
        encode_dss_signature(parsed.signature_r, parsed.signature_s),
        parsed.signed_bytes,
        "sha384",
        "snp",
        "report",
    )
    _check_tcb(parsed.reported_tcb, info)
    if info.kind == "vcek" and not parsed.mask_chip_key:
        if info.hwid is None or not hmac.compare_digest(info.hwid, parsed.chip_id):
            raise VerificationError("snp: report chip_id does not match the VCEK's hwID")
    return SnpClaims(
        report=parsed,
        product=parsed.product,
        signing_key=parsed.signing_key,
        endorsement=info,
        measurement=parsed.measurement,
        report_data=parsed.report_data,
        host_data=parsed.host_data,
        debug_allowed=parsed.policy.debug_allowed,
    )
