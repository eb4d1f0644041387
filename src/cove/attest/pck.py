"""Intel's SGX extension of a PCK certificate (OID 1.2.840.113741.1.13.1).

It states the platform's raw TCB (16 CPU SVN components and the PCE SVN),
its FMSPC and PCE id: the values a verifier matches against the TCB info.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from cove.attest import der
from cove.attest.errors import VerificationError

SGX_EXT = "1.2.840.113741.1.13.1"


@dataclass(frozen=True)
class PckExtension:
    ppid: bytes
    cpu_svn: bytes
    tcb_components: tuple[int, ...]  # 16 SVNs
    pce_svn: int
    pce_id: bytes
    fmspc: bytes
    sgx_type: int


def parse_pck_extension(cert: x509.Certificate, kind: str = "sgx") -> PckExtension:
    """Decode the SGX extension of a PCK leaf certificate."""
    raw = None
    for ext in cert.extensions:
        if ext.oid.dotted_string == SGX_EXT and isinstance(ext.value, x509.UnrecognizedExtension):
            raw = ext.value.value
    if raw is None:
        raise VerificationError(f"{kind}: PCK certificate has no SGX extension")
    fields: dict[str, tuple[int, bytes]] = {}
    for tag, body in der.tlvs(der.one(raw, der.SEQUENCE, kind), kind):
        if tag != der.SEQUENCE:
            raise VerificationError(f"{kind}: malformed SGX extension entry")
        parts = der.tlvs(body, kind)
        if len(parts) != 2 or parts[0][0] != der.OID:
            raise VerificationError(f"{kind}: malformed SGX extension entry")
        fields[der.oid_text(parts[0][1], kind).removeprefix(SGX_EXT + ".")] = parts[1]

    def get(key: str, tag: int, size: int | None = None) -> bytes:
        if key not in fields or fields[key][0] != tag:
            raise VerificationError(f"{kind}: PCK SGX extension lacks field {SGX_EXT}.{key}")
        value = fields[key][1]
        if size is not None and len(value) != size:
            raise VerificationError(f"{kind}: PCK SGX extension field {SGX_EXT}.{key} has the wrong size")
        return value

    tcb: dict[str, tuple[int, bytes]] = {}
    for tag, body in der.tlvs(get("2", der.SEQUENCE), kind):
        parts = der.tlvs(body, kind)
        if tag != der.SEQUENCE or len(parts) != 2 or parts[0][0] != der.OID:
            raise VerificationError(f"{kind}: malformed TCB entry in PCK SGX extension")
        tcb[der.oid_text(parts[0][1], kind).removeprefix(SGX_EXT + ".2.")] = parts[1]
    comps = []
    for i in range(1, 17):
        tag, body = tcb.get(str(i), (0, b""))
        if tag != der.INTEGER:
            raise VerificationError(f"{kind}: PCK SGX extension lacks TCB component {i}")
        comps.append(der.integer(body, kind))
    pce_tag, pce_body = tcb.get("17", (0, b""))
    cpu_tag, cpu_svn = tcb.get("18", (0, b""))
    if pce_tag != der.INTEGER or cpu_tag != der.OCTET_STRING or len(cpu_svn) != 16:
        raise VerificationError(f"{kind}: PCK SGX extension lacks PCESVN or CPUSVN")
    return PckExtension(
        ppid=get("1", der.OCTET_STRING),
        cpu_svn=cpu_svn,
        tcb_components=tuple(comps),
        pce_svn=der.integer(pce_body, kind),
        pce_id=get("3", der.OCTET_STRING, 2),
        fmspc=get("4", der.OCTET_STRING, 6),
        sgx_type=der.integer(get("5", der.ENUMERATED), kind),
    )
