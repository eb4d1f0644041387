"""Fuzzing the entry points: the verifier facade for every type, RA-TLS certificates, tokens, policies.

Only the library's own error types may escape: VerificationError for
evidence, TokenError for tokens, PolicyError for policies.
"""

from __future__ import annotations

import json

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cove.attest import ear, ratls, verifier
from cove.attest.errors import VerificationError
from cove.attest.policy import PolicyError, parse_policy
from cove.platform import endorse, pak
from cove.platform.reports import EnclaveClaims, ReportSigner
from cove.platform.runtime import runtime_hash
from tests.attest.attest_vectors import VECTORS

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])
INPUTS = verifier.Inputs(
    collateral=json.loads((VECTORS / "sgx/collateral.json").read_text()), vcek=(VECTORS / "snp/vcek.der").read_bytes(),
    tpm_signature=(VECTORS / "tpm/quote_sig.bin").read_bytes(), tpm_pcrs=(VECTORS / "tpm/quote_pcrs.bin").read_bytes(),
    ak=(VECTORS / "tpm/ak_pub.pem").read_bytes())
SEEDS = [(VECTORS / p).read_bytes() for p in ("sgx/quote.bin", "tdx/quote.bin", "snp/report.bin", "tpm/quote_attest.bin")]
KEY = pak.generate()
SIGNER = ReportSigner(KEY, endorse.self_certified(pak.spki(KEY), runtime_hash()))
CERT, _ = ratls.make_certificate(lambda rd: SIGNER.evidence(
    EnclaveClaims(b"\x01" * 32, b"\x02" * 32, 0, 0, False, "sim", "x", "y"), rd))
CERT_DER = x509.load_pem_x509_certificate(CERT).public_bytes(serialization.Encoding.DER)
TOKEN_KEY = ear.VerifierKey.generate()


def mutate(seed: bytes, edits, cut):
    data = bytearray(seed)
    for pos, value in edits:
        data[pos % len(data)] = value
    return bytes(data[: cut % (len(data) + 1)])


edits = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6)


@FUZZ
@given(st.sampled_from(["auto", "cove", "tpm", "sgx", "tdx", "snp"]), st.sampled_from(range(len(SEEDS))), edits,
       st.integers(0, 1 << 16))
def test_verifier_facade(kind, seed, changes, cut):
    try:
        verifier.verify(mutate(SEEDS[seed], changes, cut), kind=kind, inputs=INPUTS)
    except VerificationError:
        pass


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
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-5, 1 << 70), st.text(max_size=70),
                       st.floats(allow_nan=False, allow_infinity=False))
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=15), inner, max_size=3)),
                        max_leaves=10)


@FUZZ
@given(st.dictionaries(st.sampled_from(["version", "name", "types", "freshness", "cove", "tpm", "sgx", "tdx", "snp",
                                        "sample", "other"]), _values(), max_size=4),
       st.dictionaries(st.sampled_from(["measurements", "signers", "debug", "tcb_statuses", "backends", "isolation",
                                        "self_certified", "platform_keys", "runtime_hashes", "pcrs", "ek_ca", "min_tcb",
                                        "ek_certificates", "ak_names",
                                        "rtmrs", "max_platform_age", "roots"]), _values(), max_size=4))
def test_policies(top, rules):
    for doc in (top, {"cove": rules}, {"snp": rules}, {"tdx": rules}):
        try:
            parse_policy(doc)
        except PolicyError:
            pass
