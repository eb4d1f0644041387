"""Cove evidence: encoding round trip, every byte covered, strict parsing, fuzzing."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cove.attest import evidence as ev
from cove.attest.cove_evidence_verify import appraisal, verify_cove_evidence
from cove.attest.errors import VerificationError
from cove.attest.roots import INTEL_SGX_ROOT_CA
from cove.platform import endorse, pak
from cove.platform.reports import EnclaveClaims, ReportSigner
from cove.platform.runtime_measurement import runtime_hash

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLAIMS = EnclaveClaims(b"\x10" * 32, b"\x20" * 32, 5, 7, False, "sim", "namespaces+seccomp", "00112233aabbccdd")
RD = bytes(range(64))
KEY = pak.generate()
SIGNER = ReportSigner(KEY, endorse.self_certified(pak.spki(KEY), runtime_hash()))
BEFORE = datetime.now(timezone.utc)
EVIDENCE = SIGNER.evidence(CLAIMS, RD)
AFTER = datetime.now(timezone.utc)


def now() -> datetime:
    return datetime.now(timezone.utc)


def test_round_trip():
    claims = verify_cove_evidence(EVIDENCE, now())
    r = claims.report
    assert (r.measurement, r.signer, r.product_id, r.svn, r.debug) == (b"\x10" * 32, b"\x20" * 32, 5, 7, False)
    assert (r.backend, r.isolation, r.instance_id, r.report_data) == (
        "sim",
        "namespaces+seccomp",
        "00112233aabbccdd",
        RD,
    )
    assert claims.root == "self-certified" and claims.quote is None
    assert BEFORE - timedelta(milliseconds=1) <= r.timestamp <= AFTER
    a = appraisal(claims)
    assert a.platform_root == "self-certified" and a.issued_at == r.timestamp and a.report_data == RD


def test_every_byte_is_covered():
    """Flip any single byte of the evidence: verification fails, with a VerificationError."""
    t = now()
    for i in range(len(EVIDENCE)):
        data = bytearray(EVIDENCE)
        data[i] ^= 0x01
        with pytest.raises(VerificationError):
            verify_cove_evidence(bytes(data), t)


def test_every_report_byte_is_signed():
    """Flip a byte inside the report and re-encode the document: only the signature can notice."""
    doc = cbor2.loads(EVIDENCE)
    for i in range(len(doc["report"])):
        report = bytearray(doc["report"])
        report[i] ^= 0x80
        forged = dict(doc, report=bytes(report))
        with pytest.raises(VerificationError):
            verify_cove_evidence(cbor2.dumps(forged), now())


def test_the_self_certified_endorsement_is_signed_too():
    doc = cbor2.loads(EVIDENCE)
    emap = cbor2.loads(doc["endorsement"])
    emap["runtime"] = b"\x99" * 32
    forged = dict(doc, endorsement=cbor2.dumps(emap, canonical=True))
    with pytest.raises(VerificationError, match="signed for another endorsement"):
        verify_cove_evidence(cbor2.dumps(forged), now())


def test_another_platform_key_cannot_claim_the_report():
    other = pak.generate()
    doc = cbor2.loads(EVIDENCE)
    emap = cbor2.loads(doc["endorsement"])
    emap["pak"] = pak.spki(other)
    forged = dict(doc, endorsement=cbor2.dumps(emap, canonical=True))
    with pytest.raises(VerificationError, match="another platform key"):
        verify_cove_evidence(cbor2.dumps(forged), now())


def _doc(**changes) -> bytes:
    doc = cbor2.loads(EVIDENCE)
    doc.update(changes)
    return cbor2.dumps(doc)


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "not valid CBOR"),
        (cbor2.dumps([1, 2]), "evidence must be a map"),
        (_doc(format="other"), "format 'other' is not 'cove'"),
        (_doc(version=2), "evidence version 2 is not supported"),
        (_doc(extra=1), "unknown field 'extra'"),
        (_doc(report=b"\xa0"), "report lacks version"),
        (_doc(signature="x"), "signature must be a byte string"),
        (_doc(endorsement=cbor2.dumps({"root": "tpm"})), "endorsement lacks tpm"),
        (EVIDENCE + b"\x00", "trailing bytes"),
    ],
)
def test_malformed_evidence_names_the_problem(data, fragment):
    with pytest.raises(VerificationError) as err:
        verify_cove_evidence(data, now())
    assert fragment in err.value.message and err.value.message.startswith("cove: ")


def test_report_fields_are_checked():
    report = cbor2.loads(cbor2.loads(EVIDENCE)["report"])
    for key, value, fragment in (
        ("measurement", b"\0" * 31, "must be 32 bytes"),
        ("svn", -1, "must be an integer"),
        ("debug", 1, "true or false"),
        ("root", "magic", "is not one of"),
        ("report_data", b"\0" * 63, "64 bytes"),
    ):
        changed = dict(report, **{key: value})
        with pytest.raises(VerificationError, match=fragment):
            ev.parse_report(cbor2.dumps(changed))


def test_a_report_older_than_its_epoch_is_refused():
    endorsement = endorse.self_certified(pak.spki(KEY), runtime_hash())
    late = ev.Endorsement(
        endorsement.root,
        endorsement.pak,
        endorsement.runtime,
        endorsement.epoch,
        endorsement.epoch_start_ms + 3_600_000,
    )
    with pytest.raises(VerificationError, match="predates its platform epoch"):
        verify_cove_evidence(ReportSigner(KEY, late).evidence(CLAIMS, RD), now())


def test_report_data_must_be_64_bytes():
    from cove.errors import CoveError

    with pytest.raises(CoveError, match="64 bytes"):
        SIGNER.evidence(CLAIMS, b"short")


def test_naive_time_is_refused():
    with pytest.raises(VerificationError, match="timezone-aware"):
        verify_cove_evidence(EVIDENCE, datetime.now())


def test_evidence_verifies_in_the_future_too():
    """Validity is not time-bound for self-certified evidence; freshness is the policy's max_age."""
    assert verify_cove_evidence(EVIDENCE, now() + timedelta(days=365)).root == "self-certified"


# -- fuzzing: only VerificationError may escape


def _cbor_values():
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.binary(max_size=80),
        st.text(max_size=20),
        st.floats(allow_nan=False),
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
        max_leaves=12,
    )


def only_verification_error(fn, *args):
    try:
        fn(*args)
    except VerificationError:
        pass


@FUZZ
@given(st.binary(max_size=3000))
def test_fuzz_random_bytes(data):
    only_verification_error(verify_cove_evidence, data, now())
    only_verification_error(ev.parse_evidence, data)


@FUZZ
@given(st.sampled_from(["format", "version", "report", "signature", "endorsement"]), _cbor_values())
def test_fuzz_evidence_fields(field, value):
    only_verification_error(verify_cove_evidence, _doc(**{field: value}), now())


@FUZZ
@given(st.sampled_from(sorted(cbor2.loads(cbor2.loads(EVIDENCE)["report"]))), _cbor_values())
def test_fuzz_report_fields(field, value):
    report = dict(cbor2.loads(cbor2.loads(EVIDENCE)["report"]), **{field: value})
    only_verification_error(ev.parse_report, cbor2.dumps(report))
    only_verification_error(verify_cove_evidence, _doc(report=cbor2.dumps(report)), now())


@FUZZ
@given(
    st.sampled_from(["root", "pak", "runtime", "epoch", "epoch_start", "tpm"]),
    _cbor_values(),
    st.dictionaries(
        st.sampled_from(["attest", "signature", "pcrs", "pcr", "ak", "ak_chain", "ek_chain"]),
        _cbor_values(),
        max_size=7,
    ),
)
def test_fuzz_endorsement_fields(field, value, tpm):
    emap = dict(cbor2.loads(cbor2.loads(EVIDENCE)["endorsement"]), **{field: value})
    if field != "tpm" and tpm:
        emap["root"], emap["tpm"] = "tpm", tpm
    only_verification_error(ev.parse_endorsement, emap)
    only_verification_error(
        lambda d: verify_cove_evidence(d, now(), ek_roots=INTEL_SGX_ROOT_CA, ak_roots=INTEL_SGX_ROOT_CA),
        _doc(endorsement=cbor2.dumps(emap)),
    )


@FUZZ
@given(st.integers(0, len(EVIDENCE) - 1), st.binary(min_size=1, max_size=8), st.booleans())
def test_fuzz_mutated_evidence(pos, junk, truncate):
    data = EVIDENCE[:pos] + junk + (b"" if truncate else EVIDENCE[pos + len(junk) :])
    only_verification_error(verify_cove_evidence, data, now())
