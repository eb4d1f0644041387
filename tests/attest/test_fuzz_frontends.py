"""Fuzzing the entry points: the verifier facade for every type, RA-TLS certificates, tokens, policies.

Only the library's own error types may escape: VerificationError for
evidence, TokenError for tokens, PolicyError for policies.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cove.attest import ear, ratls, verifier
from cove.attest.appraisal import summary
from cove.attest.errors import VerificationError
from cove.attest.policy import PolicyError, parse_policy
from cove.platform import endorse, pak
from cove.platform.reports import EnclaveClaims, ReportSigner
from cove.platform.runtime_measurement import runtime_hash
from tests.attest.attest_vectors import VECTORS

FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
# Each seed with its own collateral, at a time inside that collateral's windows, so a mutant is
# refused by the check its mutation breaks (signature, QE binding, TCB matching), not by a date.
SGX_INPUTS = verifier.Inputs(collateral=json.loads((VECTORS / "sgx/collateral.json").read_text()))
TDX_INPUTS = verifier.Inputs(collateral=json.loads((VECTORS / "tdx/collateral.json").read_text()))
TPM_INPUTS = verifier.Inputs(
    tpm_signature=(VECTORS / "tpm/quote_sig.bin").read_bytes(),
    tpm_pcrs=(VECTORS / "tpm/quote_pcrs.bin").read_bytes(),
    ak=(VECTORS / "tpm/ak_pub.pem").read_bytes(),
)


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


SEEDS = [  # (kind, evidence, inputs, time)
    ("sgx", (VECTORS / "sgx/quote.bin").read_bytes(), SGX_INPUTS, _at("2025-06-19T11:56:11")),
    ("tdx", (VECTORS / "tdx/quote.bin").read_bytes(), TDX_INPUTS, _at("2025-06-19T11:16:03")),
    (
        "snp",
        (VECTORS / "snp/report.bin").read_bytes(),
        verifier.Inputs(vcek=(VECTORS / "snp/vcek.der").read_bytes()),
        _at("2026-01-01T00:00:00"),
    ),
    (
        "snp",
        (VECTORS / "snp/vlek_report.bin").read_bytes(),
        verifier.Inputs(vcek=(VECTORS / "snp/vlek.der").read_bytes()),
        _at("2025-06-01T00:00:00"),
    ),
    ("tpm", (VECTORS / "tpm/quote_attest.bin").read_bytes(), TPM_INPUTS, _at("2026-01-01T00:00:00")),
]
INPUTS = verifier.Inputs(
    collateral=SGX_INPUTS.collateral,
    vcek=SEEDS[2][2].vcek,
    tpm_signature=TPM_INPUTS.tpm_signature,
    tpm_pcrs=TPM_INPUTS.tpm_pcrs,
    ak=TPM_INPUTS.ak,
)
KEY = pak.generate()
SIGNER = ReportSigner(KEY, endorse.self_certified(pak.spki(KEY), runtime_hash()))
CERT, _ = ratls.make_certificate(
    lambda rd: SIGNER.evidence(EnclaveClaims(b"\x01" * 32, b"\x02" * 32, 0, 0, False, "sim", "x", "y"), rd)
)
CERT_DER = x509.load_pem_x509_certificate(CERT).public_bytes(serialization.Encoding.DER)
TOKEN_KEY = ear.VerifierKey.generate()


def mutate(seed: bytes, edits, cut):
    """Overwrite a few bytes; cut the end off only when ``cut`` is given (else mutants stay whole, and go deep)."""
    data = bytearray(seed)
    for pos, value in edits:
        data[pos % len(data)] = value
    return bytes(data if cut is None else data[: cut % (len(data) + 1)])


edits = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=6)
cuts = st.one_of(st.none(), st.none(), st.none(), st.integers(0, 1 << 16))


@functools.cache
def seed_claims(seed: int) -> dict:
    kind, evidence, inputs, when = SEEDS[seed]
    return summary(verifier.verify(evidence, kind=kind, inputs=inputs, now=when))


@pytest.mark.parametrize("kind, evidence, inputs, when", SEEDS, ids=["sgx", "tdx", "snp-vcek", "snp-vlek", "tpm"])
def test_unmutated_seeds_verify(kind, evidence, inputs, when):
    """Each seed verifies with its own collateral at its time: the fuzzing below starts from valid evidence."""
    for asked in ("auto", kind):
        assert verifier.verify(evidence, kind=asked, inputs=inputs, now=when).evidence_type == kind


@FUZZ
@given(st.sampled_from(range(len(SEEDS))), st.sampled_from(["auto", "own", "own", "other"]), edits, cuts)
def test_verifier_facade(seed, which, changes, cut):
    kind, evidence, inputs, when = SEEDS[seed]
    kind = {"auto": "auto", "own": kind, "other": "cove" if kind != "cove" else "tpm"}[which]
    mutant = mutate(evidence, changes, cut)
    try:
        claims = summary(verifier.verify(mutant, kind=kind, inputs=inputs, now=when))
    except VerificationError:
        return
    # Only bytes no check reads may change (e.g. a base64 character's unused bits in a PEM chain).
    assert claims == seed_claims(seed), f"a mutant of seed {seed} verified with other claims"


@pytest.mark.parametrize("seed", range(len(SEEDS)), ids=["sgx", "tdx", "snp-vcek", "snp-vlek", "tpm"])
def test_byte_flips_are_refused_by_the_deep_checks(seed):
    """Flipping any of 64 bytes spread over a seed (before a quote's PEM chain) is refused, and mostly by a
    signature or binding check: the mutants reach past the parsers and the dates."""
    kind, evidence, inputs, when = SEEDS[seed]
    end = evidence.find(b"-----BEGIN") if b"-----BEGIN" in evidence else len(evidence)
    reasons = []
    for pos in range(0, end, max(1, end // 64)):
        bad = bytearray(evidence)
        bad[pos] ^= 0x01
        try:
            verifier.verify(bytes(bad), kind=kind, inputs=inputs, now=when)
        except VerificationError as exc:
            reasons.append(exc.message)
            continue
        reasons.append(None)
    deep = [
        r
        for r in reasons
        if r
        and any(
            w in r for w in ("signature invalid", "does not bind", "does not match", "TCB", "extraData", "PCR digest")
        )
    ]
    assert "expired" not in " ".join(r for r in reasons if r)
    assert len(deep) >= len(reasons) // 2, sorted({r for r in reasons if r})[:10]
    assert all(r is not None for r in reasons), "a flipped byte was accepted"


@FUZZ
@given(st.binary(max_size=2000), st.sampled_from(["auto", "cove", "tpm", "sgx", "tdx", "snp"]))
def test_verifier_facade_random(data, kind):
    try:
        verifier.verify(data, kind=kind, inputs=INPUTS)
    except VerificationError:
        pass


@FUZZ
@given(edits, st.integers(0, 1 << 16))
def test_ratls_certificates(changes, cut):
    for seed in (CERT, CERT_DER):
        try:
            ratls.verify_certificate(mutate(seed, changes, cut))
        except VerificationError:
            pass


@FUZZ
@given(st.text(max_size=300))
def test_tokens(text):
    try:
        ear.verify_token(text, [TOKEN_KEY])
    except ear.TokenError:
        pass


def _values():
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-5, 1 << 70),
        st.text(max_size=70),
        st.floats(allow_nan=False, allow_infinity=False),
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=15), inner, max_size=3)),
        max_leaves=10,
    )


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            ["version", "name", "types", "freshness", "cove", "tpm", "sgx", "tdx", "snp", "sample", "other"]
        ),
        _values(),
        max_size=4,
    ),
    st.dictionaries(
        st.sampled_from(
            [
                "measurements",
                "signers",
                "debug",
                "tcb_statuses",
                "backends",
                "isolation",
                "self_certified",
                "platform_keys",
                "runtime_hashes",
                "pcrs",
                "ek_ca",
                "min_tcb",
                "ek_certificates",
                "ak_names",
                "rtmrs",
                "max_platform_age",
                "roots",
            ]
        ),
        _values(),
        max_size=4,
    ),
)
def test_policies(top, rules):
    for doc in (top, {"cove": rules}, {"snp": rules}, {"tdx": rules}):
        try:
            parse_policy(doc)
        except PolicyError:
            pass
