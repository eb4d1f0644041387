"""Fuzzing the DCAP parsers: only VerificationError may ever escape."""

from __future__ import annotations

import json

from dcap_helpers import ROOT, case, pem_start
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cove.attest import der
from cove.attest.dcap import verify_dcap_quote
from cove.attest.dcap_collateral import load_crl, parse_collateral, parse_qe_identity, parse_tcb_info
from cove.attest.dcap_quote import parse_dcap_quote
from cove.attest.errors import VerificationError

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
SGX_Q, SGX_C, SGX_T = case("sgx")
TDX_Q, TDX_C, TDX_T = case("tdx")
WARM = parse_collateral(SGX_C)
WARM_TDX = parse_collateral(TDX_C)
# Each quote with its own collateral, at a time inside its windows: mutants reach the signatures,
# the QE binding and TCB matching instead of stopping at an expired CRL or the wrong TCB info.
PAIRS = {"sgx": (SGX_Q, WARM, SGX_T), "tdx": (TDX_Q, WARM_TDX, TDX_T)}


def only_verification_error(fn, *args):
    try:
        fn(*args)
    except VerificationError:
        pass


def mutated(seed: bytes):
    return st.tuples(
        st.integers(0, len(seed)),
        st.lists(st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 255)), max_size=6),
    ).map(lambda t: _apply(seed, *t))


def _apply(seed, cut, edits):
    b = bytearray(seed)
    for i, v in edits:
        b[i] = v
    return bytes(b[:cut])


@FUZZ
@given(st.binary(max_size=6000))
def test_quote_parser_random(data):
    only_verification_error(parse_dcap_quote, data)


def test_unmutated_quotes_verify_with_their_own_collateral():
    for tee, (quote, collateral, when) in PAIRS.items():
        assert verify_dcap_quote(quote, collateral, ROOT, when).tee == tee


@FUZZ
@given(st.one_of(mutated(SGX_Q).map(lambda q: ("sgx", q)), mutated(TDX_Q).map(lambda q: ("tdx", q))))
def test_quote_parser_and_verifier_mutated(tee_and_data):
    tee, data = tee_and_data
    seed, collateral, when = PAIRS[tee]
    only_verification_error(parse_dcap_quote, data)
    try:
        claims = verify_dcap_quote(data, collateral, ROOT, when)
    except VerificationError:
        return
    # Accepted only if nothing a check reads changed (trailing zero padding cut, an unused base64 bit
    # of the PEM chain): everything before the chain is the seed's, and so are the claims.
    reference = verify_dcap_quote(seed, collateral, ROOT, when)
    assert data[: pem_start(seed)] == seed[: pem_start(seed)]
    assert (claims.report_data, claims.tcb_status, claims.fmspc) == (
        reference.report_data,
        reference.tcb_status,
        reference.fmspc,
    )


@FUZZ
@given(st.binary(min_size=48, max_size=48), st.binary(max_size=5000))
def test_quote_with_valid_looking_header(header, rest):
    for version, tee in ((3, 0), (4, 0x81), (5, 0x81)):
        head = version.to_bytes(2, "little") + b"\x02\x00" + tee.to_bytes(4, "little") + header[8:12]
        head += bytes.fromhex("939a7233f79c4ca9940a0db3957f0607") + header[28:]
        only_verification_error(parse_dcap_quote, head + rest)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)


@FUZZ
@given(JSON)
def test_json_bodies_random(obj):
    text = json.dumps(obj)
    for fn in (parse_tcb_info, parse_qe_identity, parse_collateral):
        only_verification_error(fn, text)
    only_verification_error(parse_collateral, obj)


@FUZZ
@given(st.sampled_from(["tcb_info", "qe_identity"]), st.text(max_size=12), JSON)
def test_json_bodies_with_one_field_replaced(which, key, value):
    body = json.loads(SGX_C[which])
    target = body["tcbLevels"][0] if key.startswith("t") and isinstance(body.get("tcbLevels"), list) else body
    target[key if key else "version"] = value
    text = json.dumps(body)
    only_verification_error(parse_tcb_info if which == "tcb_info" else parse_qe_identity, text)
    only_verification_error(verify_dcap_quote, SGX_Q, dict(SGX_C, **{which: text}), ROOT, SGX_T)


@FUZZ
@given(st.sampled_from(sorted(SGX_C)), JSON)
def test_collateral_field_replaced(field, value):
    only_verification_error(verify_dcap_quote, SGX_Q, dict(SGX_C, **{field: value}), ROOT, SGX_T)


@FUZZ
@given(st.one_of(st.binary(max_size=400), mutated(bytes.fromhex(SGX_C["pck_crl"]))))
def test_crl_loader(data):
    only_verification_error(load_crl, data, "sgx", "PCK CRL")
    only_verification_error(load_crl, data.hex(), "sgx", "PCK CRL")


@FUZZ
@given(st.binary(max_size=300))
def test_der_walker(data):
    for fn in (der.tlvs, lambda d: der.one(d, der.SEQUENCE), der.oid_text, der.integer):
        only_verification_error(fn, data)


@FUZZ
@given(st.binary(max_size=3000))
def test_root_and_chain_inputs(blob):
    only_verification_error(verify_dcap_quote, SGX_Q, WARM, blob, SGX_T)


def _pck_ext_value() -> bytes:
    from cryptography import x509

    from cove.attest._x509 import load_pem_chain
    from cove.attest.pck import SGX_EXT

    q = parse_dcap_quote(SGX_Q)
    leaf = load_pem_chain(q.cert.pck_chain_pem, "sgx", "chain")[0]
    return leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXT)).value.value


PCK_EXT = _pck_ext_value()


def _cert_with_sgx_ext(value: bytes):
    from datetime import datetime, timezone

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from cove.attest.pck import SGX_EXT

    key = _KEY
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "pck")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2020, 1, 1, tzinfo=timezone.utc))
        .not_valid_after(datetime(2030, 1, 1, tzinfo=timezone.utc))
        .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_EXT), value), critical=False)
        .sign(key, hashes.SHA256())
    )


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


_KEY = _key()


def test_pck_extension_roundtrip_through_forged_cert():
    from cove.attest.pck import parse_pck_extension

    assert parse_pck_extension(_cert_with_sgx_ext(PCK_EXT)).fmspc.hex() == "00a067110000"


@FUZZ
@given(st.one_of(mutated(PCK_EXT), st.binary(max_size=200)))
def test_pck_extension_parser(value):
    from cove.attest.pck import parse_pck_extension

    only_verification_error(parse_pck_extension, _cert_with_sgx_ext(value))
