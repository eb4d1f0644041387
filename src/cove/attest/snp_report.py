"""Parser for AMD SEV-SNP attestation reports (ABI report versions 2 to 5).

Every field of the 1184-byte report is decoded into frozen dataclasses:
guest policy and platform-info bits, the four TCB versions in the layout of
the processor family, and the little-endian ECDSA P-384 signature.
"""

from __future__ import annotations

from dataclasses import dataclass

from cove.attest._reader import Reader
from cove.attest.errors import VerificationError

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
MIN_VERSION, MAX_VERSION = 2, 5
SIG_ALGO_ECDSA_P384_SHA384 = 1
SIGNING_KEYS = {0: "vcek", 1: "vlek", 7: "none"}
# Milan and Genoa share one TCB_VERSION layout; Turin moved the fields.
PRODUCTS = ("Milan", "Genoa", "Turin")


@dataclass(frozen=True)
class GuestPolicy:
    """The guest policy the hypervisor launched the VM with."""

    abi_minor: int
    abi_major: int
    smt_allowed: bool
    migrate_ma_allowed: bool
    debug_allowed: bool
    single_socket_required: bool
    cxl_allowed: bool
    mem_aes_256_xts_required: bool
    rapl_disabled_required: bool
    ciphertext_hiding_required: bool
    page_swap_disabled: bool
    raw: int

    @classmethod
    def decode(cls, v: int) -> GuestPolicy:
        if not v >> 17 & 1:
            raise VerificationError("snp: guest policy bit 17 (reserved, must be one) is zero")

        def b(n: int) -> bool:
            return bool(v >> n & 1)

        return cls(v & 0xFF, v >> 8 & 0xFF, b(16), b(18), b(19), b(20), b(21), b(22), b(23), b(24), b(25), v)


@dataclass(frozen=True)
class PlatformInfo:
    """Platform features in force when the report was made."""

    smt_enabled: bool
    tsme_enabled: bool
    ecc_enabled: bool
    rapl_disabled: bool
    ciphertext_hiding_enabled: bool
    alias_check_complete: bool
    tio_enabled: bool
    raw: int

    @classmethod
    def decode(cls, v: int) -> PlatformInfo:
        def b(n: int) -> bool:
            return bool(v >> n & 1)

        return cls(b(0), b(1), b(2), b(3), b(4), b(5), b(7), v)


@dataclass(frozen=True)
class TcbVersion:
    """Security patch levels of the firmware components (fmc only on Turin)."""

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None
    raw: int

    @classmethod
    def decode(cls, v: int, product: str) -> TcbVersion:
        b = v.to_bytes(8, "little")
        if product == "Turin":
            return cls(bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7], fmc=b[0], raw=v)
        return cls(bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7], fmc=None, raw=v)


@dataclass(frozen=True)
class FirmwareVersion:
    major: int
    minor: int
    build: int


@dataclass(frozen=True)
class SnpReport:
    """One parsed attestation report; ``signed_bytes`` is what the VCEK signed."""

    version: int
    guest_svn: int
    policy: GuestPolicy
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: PlatformInfo
    author_key_en: bool
    mask_chip_key: bool
    signing_key: str
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid_family: int | None
    cpuid_model: int | None
    cpuid_stepping: int | None
    chip_id: bytes
    committed_tcb: TcbVersion
    current_version: FirmwareVersion
    committed_version: FirmwareVersion
    launch_tcb: TcbVersion
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature_r: int
    signature_s: int
    product: str
    signed_bytes: bytes


def product_from_cpuid(family: int, model: int) -> str | None:
    """The product a v3+ report names through its CPUID family and model."""
    if family == 0x19:
        return "Milan" if model <= 0x0F else "Genoa"
    if family == 0x1A:
        return "Turin"
    return None


def parse_snp_report(data: bytes, product: str | None = None) -> SnpReport:
    """Parse a report; ``product`` picks the TCB layout (v2 reports do not name it)."""
    r = Reader(data, "snp", big_endian=False)
    if len(r.data) != REPORT_SIZE:
        raise VerificationError(f"snp: report is {len(r.data)} bytes, expected {REPORT_SIZE}")
    version = r.u32("version")
    if not MIN_VERSION <= version <= MAX_VERSION:
        raise VerificationError(f"snp: report version {version} not supported (2 to 5)")
    guest_svn = r.u32("guest_svn")
    policy = GuestPolicy.decode(r.u64("policy"))
    family_id = r.take(16, "family_id")
    image_id = r.take(16, "image_id")
    vmpl = r.u32("vmpl")
    sig_algo = r.u32("signature_algo")
    current_raw = r.u64("current_tcb")
    plat = PlatformInfo.decode(r.u64("platform_info"))
    flags = r.u32("flags")
    r.take(4, "reserved")
    report_data = r.take(64, "report_data")
    measurement = r.take(48, "measurement")
    host_data = r.take(32, "host_data")
    id_key_digest = r.take(48, "id_key_digest")
    author_key_digest = r.take(48, "author_key_digest")
    report_id = r.take(32, "report_id")
    report_id_ma = r.take(32, "report_id_ma")
    reported_raw = r.u64("reported_tcb")
    cpuid = r.take(3, "cpuid")
    r.take(21, "reserved")
    chip_id = r.take(64, "chip_id")
    committed_raw = r.u64("committed_tcb")
    cur = r.take(4, "current version")
    com = r.take(4, "committed version")
    launch_raw = r.u64("launch_tcb")
    launch_mit = r.u64("launch_mit_vector")
    current_mit = r.u64("current_mit_vector")
    r.take(SIGNED_SIZE - r.pos, "reserved")
    sig_r = int.from_bytes(r.take(72, "signature r"), "little")
    sig_s = int.from_bytes(r.take(72, "signature s"), "little")
    if any(r.take(r.remaining(), "reserved")):
        raise VerificationError("snp: reserved bytes after the signature are not zero")
    if sig_algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise VerificationError(f"snp: signature algorithm {sig_algo} is not ECDSA P-384 SHA-384")
    key_sel = flags >> 2 & 7
    if key_sel not in SIGNING_KEYS:
        raise VerificationError(f"snp: report names unknown signing key {key_sel}")
    if vmpl > 3:
        raise VerificationError(f"snp: report VMPL {vmpl} is out of range 0..3")
    has_cpuid = version >= 3
    fam, model, step = (cpuid[0], cpuid[1], cpuid[2]) if has_cpuid else (None, None, None)
    named = product_from_cpuid(fam, model) if fam is not None and model is not None else None
    if product is not None and product not in PRODUCTS:
        raise VerificationError(f"snp: unknown product {product!r} (one of {', '.join(PRODUCTS)})")
    if product and named and product != named:
        raise VerificationError(f"snp: report is from a {named} processor, not {product}")
    prod = product or named or "Milan"

    def tcb(v: int) -> TcbVersion:
        return TcbVersion.decode(v, prod)

    def fw(b: bytes) -> FirmwareVersion:
        return FirmwareVersion(major=b[2], minor=b[1], build=b[0])

    return SnpReport(
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=family_id,
        image_id=image_id,
        vmpl=vmpl,
        signature_algo=sig_algo,
        current_tcb=tcb(current_raw),
        platform_info=plat,
        author_key_en=bool(flags & 1),
        mask_chip_key=bool(flags >> 1 & 1),
        signing_key=SIGNING_KEYS[key_sel],
        report_data=report_data,
        measurement=measurement,
        host_data=host_data,
        id_key_digest=id_key_digest,
        author_key_digest=author_key_digest,
        report_id=report_id,
        report_id_ma=report_id_ma,
        reported_tcb=tcb(reported_raw),
        cpuid_family=fam,
        cpuid_model=model,
        cpuid_stepping=step,
        chip_id=chip_id,
        committed_tcb=tcb(committed_raw),
        current_version=fw(cur),
        committed_version=fw(com),
        launch_tcb=tcb(launch_raw),
        launch_mit_vector=launch_mit if version >= 5 else None,
        current_mit_vector=current_mit if version >= 5 else None,
        signature_r=sig_r,
        signature_s=sig_s,
        product=prod,
        signed_bytes=r.data[:SIGNED_SIZE],
    )
