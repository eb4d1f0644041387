"""SGX and TDX DCAP quote verification against the real dcap-qvl vectors."""

from __future__ import annotations

import dataclasses

import dcap_qvl
import pytest
from dcap_helpers import ROOT, TODAY, case, flip_in_pem_chain, pem_start
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cove.attest.dcap import verify_dcap_quote, verify_sgx_quote, verify_tdx_quote
from cove.attest.dcap_collateral import parse_collateral
from cove.attest.dcap_quote import EnclaveReport, TdReport, parse_dcap_quote
from cove.attest.dcap_tcb import appraise
from cove.attest.errors import VerificationError

SLOW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SGX_Q, SGX_C, SGX_T = case("sgx")
TDX_Q, TDX_C, TDX_T = case("tdx")
OLD_Q, OLD_C, OLD_T = case("tdx_outdated")
WARM = {"sgx": parse_collateral(SGX_C), "tdx": parse_collateral(TDX_C)}
QUOTES = {"sgx": (SGX_Q, SGX_T), "tdx": (TDX_Q, TDX_T)}


def test_sgx_verifies_configuration_and_sw_hardening_needed():
    c = verify_sgx_quote(SGX_Q, SGX_C, ROOT, SGX_T)
    assert c.tee == "sgx" and isinstance(c.body, EnclaveReport)
    assert c.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert set(c.advisory_ids) == {"INTEL-SA-00289", "INTEL-SA-00615"}
    assert c.qe_status == "UpToDate" and c.fmspc.hex() == "00a067110000"
    assert c.pck.tcb_components[:6] == (11, 11, 2, 2, 255, 1) and c.pck.pce_svn == 13
    assert c.quote.header.version == 3


def test_tdx_verifies_up_to_date():
    c = verify_tdx_quote(TDX_Q, TDX_C, ROOT, TDX_T)
    assert c.tee == "tdx" and isinstance(c.body, TdReport)
    assert (c.tcb_status, c.advisory_ids) == ("UpToDate", ())
    assert c.tdx_module_status == "UpToDate" and c.fmspc.hex().upper() == "B0C06F000000"
    assert c.body.td_attributes_decoded.sept_ve_disable and not c.body.td_attributes_decoded.debug
    assert c.quote.header.version == 4 and len(c.body.rtmrs) == 4


def test_warm_collateral_gives_the_same_result():
    assert verify_dcap_quote(SGX_Q, WARM["sgx"], ROOT, SGX_T).tcb_status == "ConfigurationAndSWHardeningNeeded"


@pytest.mark.parametrize("name", ["sgx", "tdx"])
def test_cross_check_with_dcap_qvl(name):
    quote, coll, now = case(name)
    ours = verify_dcap_quote(quote, coll, ROOT, now)
    import json

    theirs = dcap_qvl.verify(quote, dcap_qvl.QuoteCollateralV3.from_json(json.dumps(coll)), int(now.timestamp()))
    assert ours.tcb_status == theirs.status
    assert set(ours.advisory_ids) == set(theirs.advisory_ids)
    rep = dcap_qvl.parse_quote(quote).report
    assert bytes(rep.report_data) == ours.report_data
    if name == "tdx":
        assert bytes(rep.mr_td) == ours.body.mr_td and bytes(rep.rt_mr3) == ours.body.rtmrs[3]
        assert bytes(rep.tee_tcb_svn) == ours.body.tee_tcb_svn and bytes(rep.xfam) == ours.body.xfam
    else:
        assert bytes(rep.mr_enclave) == ours.body.mr_enclave and bytes(rep.mr_signer) == ours.body.mr_signer
        assert bytes(rep.cpu_svn) == ours.body.cpu_svn


def test_outdated_tdx_rejected_with_reason():
    with pytest.raises(
        VerificationError, match=r"^tdx: platform TCB matches no TCB level in the TCB info \(FMSPC 90C06F000000\)"
    ):
        verify_dcap_quote(OLD_Q, OLD_C, ROOT, OLD_T)
    import json

    with pytest.raises(ValueError, match="No matching TCB level"):
        dcap_qvl.verify(OLD_Q, dcap_qvl.QuoteCollateralV3.from_json(json.dumps(OLD_C)), int(OLD_T.timestamp()))


@pytest.mark.parametrize(
    "name,expiry",
    [("sgx", "2025-07-19T10:23:18Z"), ("tdx", "2025-07-19T10:00:35Z"), ("tdx_outdated", "2026-03-20T10:41:15Z")],
)
def test_today_fails_for_expired_pck_crl(name, expiry):
    quote, coll, _ = case(name)
    with pytest.raises(VerificationError, match=rf"^{name[:3]}: PCK CRL expired at {expiry}$"):
        verify_dcap_quote(quote, coll, ROOT, TODAY)


def test_before_collateral_issue_fails():
    with pytest.raises(VerificationError, match="sgx: PCK CRL not valid before 2025-06-19T10:23:18Z"):
        verify_dcap_quote(SGX_Q, SGX_C, ROOT, SGX_T.replace(hour=10, minute=0))


def test_naive_time_refused():
    with pytest.raises(VerificationError, match="timezone-aware"):
        verify_dcap_quote(SGX_Q, SGX_C, ROOT, SGX_T.replace(tzinfo=None))


def test_wrong_collateral_rejected():
    with pytest.raises(VerificationError, match="^sgx: "):
        verify_dcap_quote(SGX_Q, TDX_C, ROOT, TDX_T)
    with pytest.raises(VerificationError, match="tdx: quote is an SGX quote"):
        verify_tdx_quote(SGX_Q, SGX_C, ROOT, SGX_T)


def test_other_root_rejected():
    from attest_vectors import vector

    ark = vector("snp/ask_ark_milan.pem")
    with pytest.raises(VerificationError, match="^sgx: .*(not issued by|signature invalid|not rooted in a trusted CA)"):
        verify_dcap_quote(SGX_Q, SGX_C, ark, SGX_T)


# Every byte outside the PEM chain: header, body, signature, key, QE report, its
# signature, auth data and all length/type fields, plus the trailing padding.
def _non_pem_positions(name):
    quote, _ = QUOTES[name]
    start = pem_start(quote)
    end = quote.rindex(b"-----END CERTIFICATE-----\n") + 26
    return [(name, i) for i in range(start)] + [(name, i) for i in range(end, len(quote))]


@pytest.mark.parametrize("name,i", _non_pem_positions("sgx") + _non_pem_positions("tdx"))
def test_every_quote_byte_flip_fails(name, i):
    quote, now = QUOTES[name]
    bad = bytearray(quote)
    bad[i] ^= 0x01
    with pytest.raises(VerificationError, match=f"^({name}|dcap): "):
        verify_dcap_quote(bytes(bad), WARM[name], ROOT, now)


@SLOW
@given(st.sampled_from(["sgx", "tdx"]), st.integers(0, 4000), st.integers(1, 255))
def test_pck_chain_der_flips_fail(name, index, xor):
    quote, now = QUOTES[name]
    with pytest.raises(VerificationError):
        verify_dcap_quote(flip_in_pem_chain(quote, index, xor), WARM[name], ROOT, now)


def _flip_text(text: str, i: int) -> str:
    b = bytearray(text.encode())
    b[i % len(b)] ^= 0x01
    return b.decode("latin-1")


@pytest.mark.parametrize("field", ["qe_identity", "qe_identity_signature", "tcb_info_signature"])
@pytest.mark.parametrize("name", ["sgx", "tdx"])
def test_every_small_collateral_byte_flip_fails(name, field):
    quote, coll, now = case(name)
    for i in range(len(coll[field])):
        bad = dict(coll, **{field: _flip_text(coll[field], i)})
        with pytest.raises(VerificationError):
            verify_dcap_quote(quote, bad, ROOT, now)


@SLOW
@given(st.sampled_from(["sgx", "tdx"]), st.sampled_from(["tcb_info", "pck_crl", "root_ca_crl"]), st.integers(0, 20000))
def test_large_collateral_flips_fail(name, field, i):
    quote, coll, now = case(name)
    if field == "tcb_info":
        bad = dict(coll, tcb_info=_flip_text(coll[field], i))
    else:
        der = bytearray(bytes.fromhex(coll[field]))
        der[i % len(der)] ^= 0x01
        bad = dict(coll, **{field: der.hex()})
    with pytest.raises(VerificationError):
        verify_dcap_quote(quote, bad, ROOT, now)


def _as_v5(quote: bytes) -> bytes:
    """The TDX v4 quote re-laid as v5 (body type 2): parses the same, signature no longer fits."""
    return b"\x05\x00" + quote[2:48] + b"\x02\x00" + (584).to_bytes(4, "little") + quote[48:]


def test_v5_tdx_layout_parses_and_fails_signature():
    v5 = _as_v5(TDX_Q)
    q4, q5 = parse_dcap_quote(TDX_Q), parse_dcap_quote(v5)
    assert q5.header.version == 5 and q5.body == q4.body and q5.cert == q4.cert
    assert q5.signed_bytes == v5[: 48 + 6 + 584]
    with pytest.raises(VerificationError, match="tdx: quote signature invalid"):
        verify_dcap_quote(v5, WARM["tdx"], ROOT, TDX_T)


def test_v4_sgx_layout_with_type6_nesting_parses():
    q3 = parse_dcap_quote(SGX_Q)
    sig_data = SGX_Q[436:]
    inner = sig_data[128:]
    v4_sig = sig_data[:128] + (6).to_bytes(2, "little") + len(inner).to_bytes(4, "little") + inner
    v4 = b"\x04\x00" + SGX_Q[2:432] + len(v4_sig).to_bytes(4, "little") + v4_sig
    q4 = parse_dcap_quote(v4)
    assert q4.header.version == 4 and q4.cert == q3.cert and q4.body == q3.body
    with pytest.raises(VerificationError, match="sgx: quote signature invalid"):
        verify_dcap_quote(v4, WARM["sgx"], ROOT, SGX_T)


def _appraise(name, **pck_changes):
    quote, _ = QUOTES[name]
    claims = verify_dcap_quote(quote, WARM[name], ROOT, QUOTES[name][1])
    pck = dataclasses.replace(claims.pck, **pck_changes)
    td = claims.body if name == "tdx" else None
    return appraise(WARM[name].tcb_info, WARM[name].qe_identity, pck, claims.quote.cert.qe_report, td, name)


def test_tcb_level_matching_walks_down_the_levels():
    assert _appraise("sgx").status == "ConfigurationAndSWHardeningNeeded"
    comps = (11, 11, 2, 2, 255, 1, 12) + (0,) * 9
    assert _appraise("sgx", tcb_components=comps).status == "SWHardeningNeeded"
    comps = (10, 10, 2, 2, 255, 1, 12) + (0,) * 9
    v = _appraise("sgx", tcb_components=comps)
    assert v.status == "OutOfDate" and "INTEL-SA-00828" in v.advisory_ids
    comps = (10, 10, 2, 2, 255, 1, 0) + (0,) * 9
    assert _appraise("sgx", tcb_components=comps).status == "OutOfDateConfigurationNeeded"
    with pytest.raises(VerificationError, match="matches no TCB level"):
        _appraise("sgx", pce_svn=1)


def test_tdx_pce_svn_below_levels_is_out_of_date_or_none():
    assert _appraise("tdx", pce_svn=5).status == "OutOfDate"
    with pytest.raises(VerificationError, match="matches no TCB level"):
        _appraise("tdx", pce_svn=4)


def test_revoked_level_is_a_rejection():
    info = WARM["sgx"].tcb_info
    levels = tuple(dataclasses.replace(lv, status="Revoked") for lv in info.levels)
    col = dataclasses.replace(WARM["sgx"], tcb_info=dataclasses.replace(info, levels=levels))
    claims = verify_dcap_quote(SGX_Q, WARM["sgx"], ROOT, SGX_T)
    with pytest.raises(VerificationError, match="sgx: platform TCB is Revoked"):
        appraise(col.tcb_info, col.qe_identity, claims.pck, claims.quote.cert.qe_report, None, "sgx")


def test_qe_identity_mismatches():
    claims = verify_dcap_quote(SGX_Q, WARM["sgx"], ROOT, SGX_T)
    ident = WARM["sgx"].qe_identity
    info = WARM["sgx"].tcb_info
    for change, reason in [
        ({"mrsigner": bytes(32)}, "QE MRSIGNER"),
        ({"isv_prod_id": 7}, "QE ISVPRODID"),
        ({"miscselect": 1}, "QE MISCSELECT"),
        ({"attributes": b"\xff" * 16}, "QE attributes"),
    ]:
        with pytest.raises(VerificationError, match=reason):
            appraise(info, dataclasses.replace(ident, **change), claims.pck, claims.quote.cert.qe_report, None, "sgx")
    old_qe = dataclasses.replace(claims.quote.cert.qe_report, isv_svn=6)
    v = appraise(info, ident, claims.pck, old_qe, None, "sgx")
    assert v.qe_status == "OutOfDate" and v.status == "OutOfDateConfigurationNeeded"
