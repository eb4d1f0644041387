"""TPM 2.0 quote verification against the real keylime vector and built variants."""

from __future__ import annotations

import hashlib

import pytest
from attest_vectors import vector
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cove.attest.errors import VerificationError
from cove.attest.tpm import replay_event_log, verify_tpm_quote
from cove.attest.tpm_structs import parse_attest, parse_pcr_file, parse_public, parse_signature

ATTEST = vector("tpm/quote_attest.bin")
SIG = vector("tpm/quote_sig.bin")
PCRS = vector("tpm/quote_pcrs.bin")
AK = vector("tpm/ak_pub.pem")
NONCE = vector("tpm/nonce.txt").strip()
PCR16 = bytes.fromhex("d471c0674951f0ef075aecdd42fbefa6eca6019820add0bd222d1c4e6242ce6f")


def verify(attest=ATTEST, sig=SIG, pcrs=PCRS, ak=AK, nonce=NONCE):
    return verify_tpm_quote(attest, sig, pcrs, ak, nonce)


def test_vector_verifies_with_stated_claims():
    claims = verify()
    assert claims.extra_data == NONCE == b"Ai5M5SjYjnkyv4P7itH1"
    assert claims.pcrs == {"sha256": {16: PCR16}}
    assert claims.pcr_digest == hashlib.sha256(PCR16).digest()
    assert (claims.signature_scheme, claims.signature_hash) == ("rsassa", "sha256")
    assert claims.clock_info.reset_count == 3 and claims.clock_info.safe


def test_pcr_file_parses_to_pcr16():
    assert parse_pcr_file(PCRS) == {"sha256": {16: PCR16}}


def test_pcrs_as_dict():
    assert verify(pcrs={"sha256": {16: PCR16}}).pcrs["sha256"][16] == PCR16


def test_nonce_none_skips_freshness_only():
    assert verify(nonce=None).extra_data == NONCE


def test_wrong_nonce_rejected():
    with pytest.raises(VerificationError, match="tpm: quote extraData does not match the nonce"):
        verify(nonce=NONCE + b"x")


def test_wrong_pcr_value_rejected():
    with pytest.raises(VerificationError, match="tpm: PCR digest mismatch"):
        verify(pcrs={"sha256": {16: bytes(32)}})


def test_missing_pcr_rejected():
    with pytest.raises(VerificationError, match="no value given for quoted PCR sha256:16"):
        verify(pcrs={"sha256": {15: PCR16}})


def test_other_key_rejected():
    other = rsa.generate_private_key(65537, 2048).public_key()
    with pytest.raises(VerificationError, match="tpm: quote signature invalid"):
        verify(ak=other)


@pytest.mark.parametrize("i", range(len(ATTEST)))
def test_every_attest_byte_flip_fails(i):
    bad = bytearray(ATTEST)
    bad[i] ^= 0x01
    with pytest.raises(VerificationError, match="^tpm: "):
        verify(attest=bytes(bad))


@pytest.mark.parametrize("i", range(len(SIG)))
def test_every_signature_byte_flip_fails(i):
    bad = bytearray(SIG)
    bad[i] ^= 0x80
    with pytest.raises(VerificationError, match="^tpm: "):
        verify(sig=bytes(bad))


def test_every_pcr_value_byte_flip_fails():
    for i in range(32):
        value = bytearray(PCR16)
        value[i] ^= 0xFF
        with pytest.raises(VerificationError, match="PCR digest mismatch"):
            verify(pcrs={"sha256": {16: bytes(value)}})


def _tpm2b_public_rsa(key: rsa.RSAPublicKey) -> bytes:
    n = key.public_numbers().n.to_bytes(256, "big")
    body = bytes.fromhex("0001000b00050072000000100014000b080000000000") + len(n).to_bytes(2, "big") + n
    return len(body).to_bytes(2, "big") + body


def _tpm2b_public_ecc(key: ec.EllipticCurvePublicKey) -> bytes:
    nums = key.public_numbers()
    x, y = nums.x.to_bytes(32, "big"), nums.y.to_bytes(32, "big")
    body = bytes.fromhex("0023000b00050072000000100018000b00030010")
    body += b"\x00\x20" + x + b"\x00\x20" + y
    return len(body).to_bytes(2, "big") + body


def test_tpm2b_public_form_of_the_vector_key():
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    blob = _tpm2b_public_rsa(load_pem_public_key(AK))
    assert parse_public(blob).type == "rsa"
    assert verify(ak=blob).pcrs
    assert len(parse_public(blob).name) == 34


def test_ecdsa_quote_verifies_and_flips_fail():
    priv = ec.generate_private_key(ec.SECP256R1())
    r, s = decode_dss_signature(priv.sign(ATTEST, ec.ECDSA(hashes.SHA256())))
    sig = bytes.fromhex("0018000b") + b"\x00\x20" + r.to_bytes(32, "big") + b"\x00\x20" + s.to_bytes(32, "big")
    assert parse_signature(sig).sig_alg == "ecdsa"
    claims = verify(sig=sig, ak=_tpm2b_public_ecc(priv.public_key()))
    assert claims.signature_scheme == "ecdsa"
    for i in range(len(sig)):
        bad = bytearray(sig)
        bad[i] ^= 0x04
        with pytest.raises(VerificationError):
            verify(sig=bytes(bad), ak=priv.public_key())


def test_rsapss_quote_verifies():
    priv = rsa.generate_private_key(65537, 2048)
    h = hashes.SHA256()
    raw = priv.sign(ATTEST, padding.PSS(padding.MGF1(h), 32), h)
    sig = bytes.fromhex("0016000b") + len(raw).to_bytes(2, "big") + raw
    assert verify(sig=sig, ak=priv.public_key()).signature_scheme == "rsapss"
    with pytest.raises(VerificationError, match="signature invalid"):
        verify(sig=sig[:-1] + bytes([sig[-1] ^ 1]), ak=priv.public_key())


def test_scheme_key_mismatch_rejected():
    priv = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(VerificationError, match="needs an RSA key"):
        verify(ak=priv.public_key())


def test_event_log_hook_and_replay():
    pcrs = replay_event_log([(16, "sha256", b"\x01" * 32)])
    assert pcrs["sha256"][16] == hashlib.sha256(bytes(32) + b"\x01" * 32).digest()
    seen = []
    verify_tpm_quote(ATTEST, SIG, PCRS, AK, NONCE, event_log_check=seen.append)
    assert seen == [{"sha256": {16: PCR16}}]


def test_non_quote_attest_rejected():
    bad = ATTEST[:4] + b"\x80\x17" + ATTEST[6:]
    with pytest.raises(VerificationError, match="is not a quote"):
        parse_attest(bad)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PARSERS = [parse_attest, parse_signature, parse_public, parse_pcr_file]


def _only_verification_error(fn, data):
    try:
        fn(data)
    except VerificationError:
        pass


@FUZZ
@given(st.binary(max_size=800))
def test_fuzz_parsers_random(data):
    for fn in PARSERS:
        _only_verification_error(fn, data)


def _mutations(seed: bytes):
    return st.tuples(
        st.integers(0, len(seed)),
        st.lists(st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 255)), max_size=8),
    ).map(lambda t: _apply(seed, *t))


def _apply(seed: bytes, cut: int, edits) -> bytes:
    out = bytearray(seed)
    for i, v in edits:
        out[i] = v
    return bytes(out[:cut]) if cut < len(out) and cut % 2 else bytes(out)


@FUZZ
@given(_mutations(ATTEST), _mutations(SIG), _mutations(PCRS))
def test_fuzz_mutated_vectors(attest, sig, pcrs):
    _only_verification_error(parse_attest, attest)
    _only_verification_error(parse_signature, sig)
    _only_verification_error(parse_pcr_file, pcrs)
    _only_verification_error(lambda _: verify(attest=attest, sig=sig, pcrs=pcrs), None)


@FUZZ
@given(st.integers(0, len(ATTEST)), st.integers(0, len(SIG)), st.integers(0, len(PCRS)))
def test_fuzz_truncations(a, s, p):
    if (a, s, p) == (len(ATTEST), len(SIG), len(PCRS)):
        return
    with pytest.raises(VerificationError):
        verify(attest=ATTEST[:a], sig=SIG[:s], pcrs=PCRS[:p])


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_public_key_inputs(blob):
    _only_verification_error(lambda b: verify(ak=b), blob)
