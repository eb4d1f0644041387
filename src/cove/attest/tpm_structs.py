"""Parsers for the TPM 2.0 structures that make up a quote.

A quote arrives as three blobs produced by the TPM or tpm2-tools: the signed
TPMS_ATTEST, its TPMT_SIGNATURE, and the PCR values in tpm2-tools' ``-o``
file. Each is parsed into a frozen dataclass; anything malformed raises
:class:`VerificationError`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cove.attest._reader import Reader
from cove.attest.errors import VerificationError

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018

ALG_RSA = 0x0001
ALG_NULL = 0x0010
ALG_RSASSA = 0x0014
ALG_RSAPSS = 0x0016
ALG_ECDSA = 0x0018
ALG_ECC = 0x0023

HASH_ALGS: dict[int, str] = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512"}
HASH_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
ECC_CURVES = {0x0003: "secp256r1", 0x0004: "secp384r1", 0x0005: "secp521r1"}


def hash_name(alg: int, kind: str = "tpm") -> str:
    """The hashlib name of a TPM_ALG_ID hash, or a clear error."""
    try:
        return HASH_ALGS[alg]
    except KeyError:
        raise VerificationError(f"{kind}: unsupported hash algorithm 0x{alg:04x}") from None


@dataclass(frozen=True)
class PcrSelection:
    """One bank of a TPML_PCR_SELECTION: a hash and the PCR indices chosen."""

    hash_alg: str
    pcrs: tuple[int, ...]


@dataclass(frozen=True)
class ClockInfo:
    clock: int
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True)
class TpmsAttest:
    """A parsed TPMS_ATTEST of type quote."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    pcr_select: tuple[PcrSelection, ...]
    pcr_digest: bytes


@dataclass(frozen=True)
class TpmtSignature:
    """A parsed TPMT_SIGNATURE; ``signature`` holds RSA bytes, ``r``/``s`` ECDSA."""

    sig_alg: str  # "rsassa", "rsapss" or "ecdsa"
    hash_alg: str
    signature: bytes = b""
    r: int = 0
    s: int = 0


@dataclass(frozen=True)
class TpmPublic:
    """The parts of a TPMT_PUBLIC needed to verify with it."""

    type: str  # "rsa" or "ecc"
    name_alg: str
    object_attributes: int
    rsa_modulus: bytes = b""
    rsa_exponent: int = 65537
    ecc_curve: str = ""
    ecc_x: bytes = b""
    ecc_y: bytes = b""
    name: bytes = b""
    symmetric_bits: int = 0  # a storage key's symmetric cipher (AES) key size; 0 for none


def _selection(r: Reader, what: str) -> tuple[PcrSelection, ...]:
    count = r.u32(f"{what} count")
    if count > 16:
        raise VerificationError(f"tpm: {what} has {count} banks (at most 16)")
    out = []
    for _ in range(count):
        alg = hash_name(r.u16(f"{what} hash"))
        size = r.u8(f"{what} sizeofSelect")
        if size > 4:
            raise VerificationError(f"tpm: {what} selects {size * 8} PCRs (at most 32)")
        bits = r.take(size, f"{what} bitmap")
        pcrs = tuple(i * 8 + b for i, byte in enumerate(bits) for b in range(8) if byte >> b & 1)
        out.append(PcrSelection(alg, pcrs))
    return tuple(out)


def parse_attest(data: bytes) -> TpmsAttest:
    """Parse a TPMS_ATTEST and insist that it is a TPM-generated quote."""
    r = Reader(data, "tpm", big_endian=True)
    magic = r.u32("magic")
    if magic != TPM_GENERATED_VALUE:
        raise VerificationError(f"tpm: attest magic 0x{magic:08x} is not TPM_GENERATED_VALUE")
    typ = r.u16("type")
    if typ != TPM_ST_ATTEST_QUOTE:
        raise VerificationError(f"tpm: attest type 0x{typ:04x} is not a quote (0x8018)")
    signer = r.sized(2, "qualifiedSigner")
    extra = r.sized(2, "extraData")
    clock = ClockInfo(r.u64("clock"), r.u32("resetCount"), r.u32("restartCount"), r.u8("safe") == 1)
    firmware = r.u64("firmwareVersion")
    sel = _selection(r, "pcrSelect")
    digest = r.sized(2, "pcrDigest")
    r.end("TPMS_ATTEST")
    return TpmsAttest(magic, typ, signer, extra, clock, firmware, sel, digest)


def parse_signature(data: bytes) -> TpmtSignature:
    """Parse a TPMT_SIGNATURE of scheme RSASSA, RSAPSS or ECDSA."""
    r = Reader(data, "tpm", big_endian=True)
    alg = r.u16("sigAlg")
    if alg in (ALG_RSASSA, ALG_RSAPSS):
        h = hash_name(r.u16("signature hash"))
        sig = r.sized(2, "signature")
        r.end("TPMT_SIGNATURE")
        return TpmtSignature("rsassa" if alg == ALG_RSASSA else "rsapss", h, signature=sig)
    if alg == ALG_ECDSA:
        h = hash_name(r.u16("signature hash"))
        sr = int.from_bytes(r.sized(2, "signatureR"), "big")
        ss = int.from_bytes(r.sized(2, "signatureS"), "big")
        r.end("TPMT_SIGNATURE")
        return TpmtSignature("ecdsa", h, r=sr, s=ss)
    raise VerificationError(f"tpm: unsupported signature scheme 0x{alg:04x}")


def _scheme(r: Reader, what: str) -> None:
    if r.u16(what) != ALG_NULL:
        r.u16(f"{what} hash")


def parse_public(data: bytes) -> TpmPublic:
    """Parse a TPM2B_PUBLIC (RSA or ECC) and compute its TPM Name."""
    outer = Reader(data, "tpm", big_endian=True)
    body = outer.sized(2, "TPM2B_PUBLIC")
    outer.end("TPM2B_PUBLIC")
    r = Reader(body, "tpm", big_endian=True)
    typ = r.u16("public type")
    name_alg_id = r.u16("nameAlg")
    name_alg = hash_name(name_alg_id)
    attrs = r.u32("objectAttributes")
    r.sized(2, "authPolicy")
    sym = r.u16("symmetric")
    sym_bits = 0
    if sym != ALG_NULL:
        sym_bits = r.u16("symmetric keyBits")
        r.u16("symmetric mode")
    name = name_alg_id.to_bytes(2, "big") + hashlib.new(name_alg, body).digest()
    if typ == ALG_RSA:
        _scheme(r, "rsa scheme")
        r.u16("keyBits")
        exp = r.u32("exponent") or 65537
        mod = r.sized(2, "modulus")
        r.end("TPMT_PUBLIC")
        if not mod:
            raise VerificationError("tpm: RSA public key has an empty modulus")
        return TpmPublic("rsa", name_alg, attrs, rsa_modulus=mod, rsa_exponent=exp, name=name, symmetric_bits=sym_bits)
    if typ == ALG_ECC:
        _scheme(r, "ecc scheme")
        curve_id = r.u16("curveID")
        _scheme(r, "kdf")
        x = r.sized(2, "x")
        y = r.sized(2, "y")
        r.end("TPMT_PUBLIC")
        curve = ECC_CURVES.get(curve_id)
        if curve is None:
            raise VerificationError(f"tpm: unsupported ECC curve 0x{curve_id:04x}")
        return TpmPublic("ecc", name_alg, attrs, ecc_curve=curve, ecc_x=x, ecc_y=y, name=name, symmetric_bits=sym_bits)
    raise VerificationError(f"tpm: unsupported public key type 0x{typ:04x}")


# tpm2-tools writes C structs: TPMS_PCR_SELECTION is 2+1+4 bytes padded to 8,
# TPM2B_DIGEST is 2+64 bytes, TPML_DIGEST holds 8 of them.
_SEL_STRUCT = 8
_SEL_SLOTS = 16
_DIGEST_STRUCT = 66
_DIGEST_SLOTS = 8


def parse_pcr_file(data: bytes) -> dict[str, dict[int, bytes]]:
    """Parse tpm2_quote's ``-o`` output into {hash: {pcr index: value}}."""
    r = Reader(data, "tpm", big_endian=False)
    count = r.u32("pcr file selection count")
    if count > _SEL_SLOTS:
        raise VerificationError(f"tpm: pcr file selects {count} banks (at most 16)")
    banks: list[PcrSelection] = []
    for i in range(_SEL_SLOTS):
        slot = Reader(r.take(_SEL_STRUCT, "pcr file selection"), "tpm", big_endian=False)
        alg = slot.u16("pcr file hash")
        size = slot.u8("pcr file sizeofSelect")
        bits = slot.take(4, "pcr file bitmap")
        if i < count:
            if size > 4:
                raise VerificationError(f"tpm: pcr file selects {size * 8} PCRs (at most 32)")
            pcrs = tuple(j * 8 + b for j, byte in enumerate(bits[:size]) for b in range(8) if byte >> b & 1)
            banks.append(PcrSelection(hash_name(alg), pcrs))
    n_lists = r.u32("pcr file digest list count")
    values: list[bytes] = []
    if n_lists > 64:
        raise VerificationError(f"tpm: pcr file claims {n_lists} digest lists")
    for _ in range(n_lists):
        lst = Reader(r.take(4 + _DIGEST_SLOTS * _DIGEST_STRUCT, "pcr file digest list"), "tpm", big_endian=False)
        n = lst.u32("pcr file digest count")
        if n > _DIGEST_SLOTS:
            raise VerificationError(f"tpm: pcr file digest list holds {n} digests (at most 8)")
        for k in range(_DIGEST_SLOTS):
            slot = Reader(lst.take(_DIGEST_STRUCT, "pcr file digest"), "tpm", big_endian=False)
            size = slot.u16("pcr file digest size")
            if k < n:
                if size > 64:
                    raise VerificationError(f"tpm: pcr file digest of {size} bytes (at most 64)")
                values.append(slot.take(size, "pcr file digest"))
    r.end("pcr file")
    wanted = sum(len(b.pcrs) for b in banks)
    if wanted != len(values):
        raise VerificationError(f"tpm: pcr file selects {wanted} PCRs but holds {len(values)} values")
    out: dict[str, dict[int, bytes]] = {}
    it = iter(values)
    for bank in banks:
        dest = out.setdefault(bank.hash_alg, {})
        for pcr in bank.pcrs:
            value = next(it)
            if len(value) != HASH_SIZES[bank.hash_alg]:
                raise VerificationError(f"tpm: pcr file value for {bank.hash_alg} PCR {pcr} is {len(value)} bytes")
            dest[pcr] = value
    return out
