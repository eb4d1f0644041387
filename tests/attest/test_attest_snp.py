"""SEV-SNP report verification: the real Milan vector, forged PKIs for the edge cases."""

from __future__ import annotations

import struct
from datetime import datetime, timezone

import pytest
from attest_vectors import vector
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from snp_forge import ForgedAmd, set_field, sign_report

from cove.attest.errors import VerificationError
from cove.attest.snp import endorsement_info, verify_snp_report
from cove.attest.snp_report import GuestPolicy, TcbVersion, parse_snp_report

REPORT = vector("snp/report.bin")
VCEK = vector("snp/vcek.der")
MILAN = vector("snp/ask_ark_milan.pem")
GENOA = vector("snp/ask_ark_genoa.pem")
NOW = datetime(2026, 11, 15, tzinfo=timezone.utc)
MEASUREMENT = (
    "b07af9620f3b839b47996422ddec6058338951d984e3121151 31ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01".replace(" ", "")
)


def verify(report=REPORT, vcek=VCEK, chain=MILAN, now=NOW, **kw):
    return verify_snp_report(report, vcek, chain, now, **kw)


def test_vector_verifies_with_claims():
    c = verify()
    r = c.report
    assert (c.product, c.signing_key, r.version) == ("Milan", "vcek", 2)
    assert c.measurement.hex() == MEASUREMENT
    assert c.report_data[:5] == bytes([1, 2, 3, 4, 5]) and not any(c.report_data[5:])
    assert r.reported_tcb == TcbVersion(bootloader=2, tee=0, snp=5, microcode=0x44, fmc=None, raw=r.reported_tcb.raw)
    assert c.endorsement.tcb == {"bootloader": 2, "tee": 0, "snp": 5, "microcode": 0x44}
    assert c.endorsement.product == "Milan-B0"
    assert r.chip_id == c.endorsement.hwid
    assert r.policy.debug_allowed and r.policy.smt_allowed and not r.policy.migrate_ma_allowed
    assert r.platform_info.smt_enabled and r.vmpl == 0 and r.guest_svn == 0
    assert r.cpuid_family is None and r.launch_mit_vector is None


def test_vcek_expiry_is_the_reason_after_2029():
    with pytest.raises(VerificationError, match=r"^snp: SEV-VCEK certificate expired at 2029-09-24"):
        verify(now=datetime(2029, 10, 1, tzinfo=timezone.utc))


def test_before_vcek_issue_rejected():
    with pytest.raises(VerificationError, match="not valid before 2022-09-24"):
        verify(now=datetime(2022, 1, 1, tzinfo=timezone.utc))


def test_naive_time_rejected():
    with pytest.raises(VerificationError, match="timezone-aware"):
        verify(now=datetime(2026, 11, 1))


def test_genoa_chain_rejected():
    with pytest.raises(
        VerificationError,
        match="issuer SEV-Milan is not in the trusted AMD chain "
        r"\(SEV-Genoa, ARK-Genoa\)",
    ):
        verify(chain=GENOA)


def test_bundle_order_does_not_matter():
    """AMD publishes ASK, ARK, ASVK; others write ARK first: the issuers are found by name."""
    ask, ark = MILAN.split(b"-----END CERTIFICATE-----\n", 1)
    assert verify(chain=ark + ask + b"-----END CERTIFICATE-----\n").signing_key == "vcek"


def test_genoa_layout_decodes_differently_from_turin():
    t = TcbVersion.decode(0x4405000000000102, "Genoa")
    assert (t.bootloader, t.tee, t.snp, t.microcode) == (2, 1, 5, 0x44)
    t = TcbVersion.decode(0x4400000000050403, "Turin")
    assert (t.fmc, t.bootloader, t.tee, t.snp, t.microcode) == (3, 4, 5, 0, 0x44)


def test_policy_reserved_bit_required():
    with pytest.raises(VerificationError, match="bit 17"):
        GuestPolicy.decode(0)


@pytest.mark.parametrize("i", range(0x2A0))
def test_every_signed_byte_flip_fails(i):
    bad = bytearray(REPORT)
    bad[i] ^= 0x01
    with pytest.raises(VerificationError, match="^snp: "):
        verify(report=bytes(bad))


@pytest.mark.parametrize("i", range(0x2A0, 0x4A0, 3))
def test_signature_and_reserved_byte_flips_fail(i):
    bad = bytearray(REPORT)
    bad[i] ^= 0x10
    with pytest.raises(VerificationError, match="^snp: "):
        verify(report=bytes(bad))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(VCEK) - 1), st.integers(1, 255))
def test_vcek_byte_flips_fail(i, x):
    bad = bytearray(VCEK)
    bad[i] ^= x
    with pytest.raises(VerificationError):
        verify(vcek=bytes(bad))


def _der_chain_flip(i: int, x: int) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    certs = x509.load_pem_x509_certificates(MILAN)
    ders = [c.public_bytes(Encoding.DER) for c in certs]
    which, i = (0, i) if i < len(ders[0]) else (1, i - len(ders[0]))
    der = bytearray(ders[which])
    der[i % len(der)] ^= x
    ders[which] = bytes(der)
    import base64

    def pem(d):
        b = base64.encodebytes(d).replace(b"\n", b"")
        lines = b"\n".join(b[k : k + 64] for k in range(0, len(b), 64))
        return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"

    return b"".join(pem(d) for d in ders)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2 * 1600), st.integers(1, 255))
def test_ask_ark_byte_flips_fail(i, x):
    with pytest.raises(VerificationError):
        verify(chain=_der_chain_flip(i, x))


# Forged PKI: cases the real vector cannot show.


@pytest.fixture(scope="module")
def amd():
    return ForgedAmd("Milan")


def _forged(amd, tcb=None, *, hwid=None, csp=None, flags=0, chip=None, reported=None):
    tcb = tcb or {"bootloader": 2, "tee": 0, "snp": 5, "microcode": 0x44}
    chip_id = chip if chip is not None else REPORT[0x1A0:0x1E0]
    key, cert = amd.endorsement(tcb, hwid=REPORT[0x1A0:0x1E0] if csp is None and hwid is None else hwid, csp=csp)
    body = set_field(REPORT, 0x48, struct.pack("<I", flags))
    body = set_field(body, 0x1A0, chip_id)
    if reported is not None:
        body = set_field(body, 0x180, struct.pack("<Q", reported))
    return sign_report(body, key), cert


def test_forged_pki_verifies(amd):
    report, cert = _forged(amd)
    c = verify(report=report, vcek=cert, chain=amd.chain_pem(), now=datetime(2024, 6, 1, tzinfo=timezone.utc))
    assert c.signing_key == "vcek"


def test_forged_chain_is_not_amd(amd):
    report, cert = _forged(amd)
    with pytest.raises(VerificationError, match="not in the trusted AMD chain"):
        verify(report=report, vcek=cert, now=datetime(2024, 6, 1, tzinfo=timezone.utc))


def test_reported_tcb_mismatch(amd):
    report, cert = _forged(amd, {"bootloader": 2, "tee": 0, "snp": 6, "microcode": 0x44})
    with pytest.raises(VerificationError, match="reported TCB snp SPL 5 does not match the VCEK's 6"):
        verify(report=report, vcek=cert, chain=amd.chain_pem(), now=datetime(2024, 6, 1, tzinfo=timezone.utc))


def test_chip_id_mismatch_and_mask(amd):
    report, cert = _forged(amd, chip=bytes(64))
    with pytest.raises(VerificationError, match="chip_id does not match"):
        verify(report=report, vcek=cert, chain=amd.chain_pem(), now=datetime(2024, 6, 1, tzinfo=timezone.utc))
    report, cert = _forged(amd, chip=bytes(64), flags=0b10)
    assert verify(
        report=report, vcek=cert, chain=amd.chain_pem(), now=datetime(2024, 6, 1, tzinfo=timezone.utc)
    ).report.mask_chip_key


def test_vlek_supported_and_kind_checked(amd):
    report, cert = _forged(amd, csp="cloud-1", flags=1 << 2)
    c = verify(report=report, vcek=cert, chain=amd.chain_pem(), now=datetime(2024, 6, 1, tzinfo=timezone.utc))
    assert (c.signing_key, c.endorsement.csp_id, c.endorsement.hwid) == ("vlek", "cloud-1", None)
    report2, _ = _forged(amd, csp="cloud-1", flags=0)
    with pytest.raises(VerificationError, match="signed by a VCEK but a VLEK was given"):
        verify(report=report2, vcek=cert, chain=amd.chain_pem(), now=datetime(2024, 6, 1, tzinfo=timezone.utc))


def test_unsigned_report_rejected(amd):
    report, cert = _forged(amd, flags=7 << 2)
    with pytest.raises(VerificationError, match="unsigned"):
        verify(report=report, vcek=cert, chain=amd.chain_pem(), now=datetime(2024, 6, 1, tzinfo=timezone.utc))


def test_v3_report_names_its_product(amd):
    body = set_field(REPORT, 0, struct.pack("<I", 3))
    body = set_field(body, 0x188, bytes([0x19, 0x11, 0x01]))
    assert parse_snp_report(body).product == "Genoa"
    with pytest.raises(VerificationError, match="from a Genoa processor, not Milan"):
        parse_snp_report(body, "Milan")


def test_endorsement_info_of_vector():
    from cove.attest._x509 import load_der_cert

    info = endorsement_info(load_der_cert(VCEK, "snp", "VCEK"))
    assert info.not_after.year == 2029
    assert info.kind == "vcek" and len(info.hwid) == 64


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.one_of(st.binary(max_size=1300), st.binary(min_size=0x4A0, max_size=0x4A0)))
def test_fuzz_parser_random(data):
    try:
        parse_snp_report(data)
    except VerificationError:
        pass


@FUZZ
@given(st.integers(0, 0x4A0), st.lists(st.tuples(st.integers(0, 0x49F), st.integers(0, 255)), max_size=6))
def test_fuzz_mutated_report(cut, edits):
    data = bytearray(REPORT)
    for i, v in edits:
        data[i] = v
    data = bytes(data[:cut])
    for fn in (parse_snp_report, lambda d: verify(report=d)):
        try:
            fn(data)
        except VerificationError:
            pass


@FUZZ
@given(st.binary(max_size=1500))
def test_fuzz_certificates(blob):
    for kw in ({"vcek": blob}, {"chain": blob}):
        try:
            verify(**kw)
        except VerificationError:
            pass


# VLEK: the real Trustee vector (Milan, signed by AMD's ASVK), AMD's three-certificate bundles.
VLEK_REPORT = vector("snp/vlek_report.bin")
VLEK = vector("snp/vlek.der")
VLEK_TIME = datetime(2025, 6, 1, tzinfo=timezone.utc)  # inside the VLEK's 2024-12-10 .. 2025-12-10


def test_builtin_roots_hold_ask_ark_and_asvk_per_product():
    from cryptography import x509

    from cove.attest import roots

    assert set(roots.AMD_ASK_ARK) == {"Milan", "Genoa", "Turin"}
    for product, pem in roots.AMD_ASK_ARK.items():
        names = [
            c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
            for c in x509.load_pem_x509_certificates(pem)
        ]
        assert names == [f"SEV-{product}", f"ARK-{product}", f"SEV-VLEK-{product}"]


def test_vlek_vector_verifies_with_the_builtin_roots():
    from cove.attest import verifier
    from cove.attest.verifier import Inputs

    a = verifier.verify(VLEK_REPORT, now=VLEK_TIME, inputs=Inputs(vcek=VLEK))
    assert (a.evidence_type, a.claims["signing_key"]) == ("snp", "vlek")
    assert verifier.detect(VLEK_REPORT) == "snp"  # a v3 report, not an SGX quote header


@pytest.mark.parametrize(
    "bundle, ok",
    [
        ("milan_ask_ark_asvk.pem", True),
        ("genoa_ask_ark_asvk.pem", False),
        ("turin_ask_ark_asvk.pem", False),
        ("ask_ark_milan.pem", False),
    ],
)
def test_vlek_vector_with_each_bundle(bundle, ok):
    if ok:
        c = verify(report=VLEK_REPORT, vcek=VLEK, chain=vector(f"snp/{bundle}"), now=VLEK_TIME)
        assert (c.signing_key, c.product, c.endorsement.kind) == ("vlek", "Milan", "vlek")
        assert c.endorsement.csp_id and c.endorsement.hwid is None
    else:
        with pytest.raises(
            VerificationError,
            match=r"issuer SEV-VLEK-Milan is not in the trusted AMD chain .*"
            r"a VLEK needs its product's ASVK",
        ) as info:
            verify(report=VLEK_REPORT, vcek=VLEK, chain=vector(f"snp/{bundle}"), now=VLEK_TIME)
        assert "ASVK" in info.value.line()


@pytest.mark.parametrize("bundle", ["milan_ask_ark_asvk.pem", "ask_ark_milan.pem"])
def test_vcek_vector_with_two_and_three_certificate_bundles(bundle):
    assert verify(chain=vector(f"snp/{bundle}")).signing_key == "vcek"


def test_vlek_tampered_or_expired_refused():
    bad = bytearray(VLEK_REPORT)
    bad[0x90] ^= 1
    with pytest.raises(VerificationError, match="signature"):
        verify(report=bytes(bad), vcek=VLEK, chain=vector("snp/milan_ask_ark_asvk.pem"), now=VLEK_TIME)
    with pytest.raises(VerificationError, match="SEV-VLEK certificate expired at 2025-12-10"):
        verify(
            report=VLEK_REPORT,
            vcek=VLEK,
            chain=vector("snp/milan_ask_ark_asvk.pem"),
            now=datetime(2026, 1, 1, tzinfo=timezone.utc),
        )


def test_vlek_signed_by_the_ask_is_not_amd_shape(amd):
    """AMD's ASK signs VCEKs only; a VLEK under it does not fit ARK -> ASVK -> VLEK."""
    key, cert = amd.endorsement({"bootloader": 2, "tee": 0, "snp": 5, "microcode": 0x44}, csp="cloud-1", by_ask=True)
    body = set_field(REPORT, 0x48, struct.pack("<I", 1 << 2))
    with pytest.raises(VerificationError, match="not the vendor's shape"):
        verify(
            report=sign_report(body, key),
            vcek=cert,
            chain=amd.chain_pem(),
            now=datetime(2024, 6, 1, tzinfo=timezone.utc),
        )


def test_issuer_that_is_not_a_ca_is_refused():
    """An ASK whose BasicConstraints say cA=false may not issue a VCEK, even in a trusted bundle."""
    from cryptography.hazmat.primitives import serialization

    amd = ForgedAmd("Milan")
    amd.ask = amd.issue(amd.ask.subject, amd.ark.subject, amd.ask_key.public_key(), amd.ark_key, ca=False)
    report, cert = _forged(amd)
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (amd.ask, amd.ark))
    with pytest.raises(
        VerificationError, match=r"SEV-Milan issued a certificate but is not a CA \(BasicConstraints cA=false\)"
    ):
        verify(report=report, vcek=cert, chain=chain, now=datetime(2024, 6, 1, tzinfo=timezone.utc))


def test_signature_unused_bits_byte_is_refused():
    """The byte before a certificate's signature is not signed; non-zero is not DER and is refused."""
    from cryptography import x509

    offset = len(VCEK) - len(x509.load_der_x509_certificate(VCEK).signature) - 1
    bad = bytearray(VCEK)
    bad[offset] ^= 1
    with pytest.raises(VerificationError, match="signature"):
        verify(vcek=bytes(bad))
    with pytest.raises(VerificationError, match="unused bits"):
        verify(chain=_der_chain_flip(1164, 1))  # the ASK's
