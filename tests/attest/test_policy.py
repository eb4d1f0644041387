"""The policy language: parsing, clear errors, defaults that deny, every rule able to fail."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cove.attest import appraisal as ap
from cove.attest.dcap import verify_dcap_quote
from cove.attest.policy import PolicyError, default_policy, evaluate, load_policy, parse_policy
from cove.attest.snp import verify_snp_report
from cove.attest.tpm import verify_tpm_quote
from tests.attest.attest_vectors import collateral, vector

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
M1, M2 = bytes(range(32)), bytes(32)
SIGNER = b"\x11" * 32


def cove(**kw) -> ap.Appraisal:
    base = dict(
        evidence_type="cove",
        measurement=M1,
        signer=SIGNER,
        product_id=7,
        svn=3,
        debug=False,
        backend="sim",
        isolation="namespaces+seccomp",
        report_data=b"N" * 16 + bytes(48),
        issued_at=NOW,
        platform_root="tpm",
        platform_key=b"\x22" * 32,
        runtime=b"\x33" * 32,
        pcrs={"sha256": {0: bytes(32), 23: b"\x44" * 32}},
        platform_issued_at=NOW,
    )
    base.update(kw)
    return ap.Appraisal(**base)


def test_default_policy_accepts_clean_tpm_rooted_evidence():
    result = evaluate(default_policy(), cove(), now=NOW)
    assert result.accepted, result.reasons
    assert result.components == {"platform": "affirming", "enclave": "affirming"}
    assert result.policy_id == "cove:default"


@pytest.mark.parametrize(
    "change, reason, component",
    [
        ({"platform_root": "self-certified"}, "self-certified", "platform"),
        ({"debug": True}, "debug enclave", "enclave"),
    ],
)
def test_default_policy_denies(change, reason, component):
    result = evaluate(default_policy(), cove(**change), now=NOW)
    assert not result.accepted
    assert any(reason in r for r in result.reasons)
    assert result.components[component] == "contraindicated"


def test_relaxed_rules_accept_with_a_warning():
    policy = parse_policy("[cove]\nself_certified = true\ndebug = true\n")
    result = evaluate(policy, cove(platform_root="self-certified", debug=True), now=NOW)
    assert result.accepted
    assert result.components == {"platform": "warning", "enclave": "warning"}
    assert len(result.warnings) == 2


def test_measurements_and_signers():
    policy = parse_policy(
        f'[cove]\nmeasurements = ["{M2.hex()}"]\n'
        f'[[cove.signers]]\nsigner = "{SIGNER.hex()}"\nproduct_id = 7\nmin_svn = 3\n'
    )
    assert evaluate(policy, cove(), now=NOW).accepted  # by signer
    assert evaluate(policy, cove(measurement=M2, signer=b"x" * 32), now=NOW).accepted  # by measurement
    for change in ({"svn": 2}, {"product_id": 8}, {"signer": b"\x12" * 32}):
        result = evaluate(policy, cove(**change), now=NOW)
        assert not result.accepted and "is not one the policy accepts" in result.reasons[0], change


def test_measurement_only_policy_rejects_other_measurement():
    policy = parse_policy(json.dumps({"cove": {"measurements": [M1.hex()]}}))
    assert evaluate(policy, cove(), now=NOW).accepted
    result = evaluate(policy, cove(measurement=M2), now=NOW)
    assert result.reasons == (f"measurement {M2.hex()} is not one the policy accepts",)


def test_types_named_by_tables_only():
    policy = parse_policy(f'[cove]\nmeasurements = ["{M1.hex()}"]\n')
    result = evaluate(policy, ap.Appraisal(evidence_type="sgx", measurement=M1, tcb_status="UpToDate"), now=NOW)
    assert not result.accepted and "evidence type sgx is not accepted" in result.reasons[0]
    assert "sample" not in default_policy().types


def test_backends_isolation_runtime_platform_key_pcrs():
    policy = parse_policy(
        '[cove]\nbackends = ["vm"]\nisolation = ["micro-VM"]\n'
        f'runtime_hashes = ["{"ab" * 32}"]\nplatform_keys = ["{"cd" * 32}"]\n'
        f'[cove.pcrs.sha256]\n0 = "{"00" * 32}"\n23 = "{"55" * 32}"\n7 = "{"00" * 32}"\n'
    )
    result = evaluate(policy, cove(), now=NOW)
    text = "\n".join(result.reasons)
    for fragment in (
        "backend sim",
        "isolation namespaces+seccomp",
        "Cove runtime",
        "platform key",
        "PCR sha256:23 is 4444",
        "PCR sha256:7 is not in the quote",
    ):
        assert fragment in text
    assert "PCR sha256:0" not in text


def test_pinned_tpm_ek_certificate_and_ak():
    ek, ak = b"\x66" * 32, bytes.fromhex("000b") + b"\x77" * 32
    policy = parse_policy(f'[cove]\nek_certificates = ["{ek.hex()}"]\nak_names = ["{ak.hex()}"]\n')
    assert evaluate(policy, cove(ek_certificate=ek, ak_name=ak), now=NOW).accepted
    other = evaluate(policy, cove(ek_certificate=b"\x67" * 32, ak_name=ak), now=NOW)
    assert other.reasons == (f"TPM EK certificate {'67' * 32} is not one the policy accepts (another TPM, or no TPM)",)
    assert other.components["platform"] == "contraindicated"
    unrooted = evaluate(policy, cove(platform_root="self-certified"), now=NOW).reasons
    assert any("self-certified" in r for r in unrooted)
    assert any("TPM EK certificate none" in r for r in unrooted) and any("attestation key none" in r for r in unrooted)
    with pytest.raises(PolicyError, match="cove.ek_certificates\\[0\\]: must be 32 bytes"):
        parse_policy('[cove]\nek_certificates = ["abcd"]\n')
    with pytest.raises(PolicyError, match="cove.ak_names\\[0\\]: must be a hex string"):
        parse_policy('[cove]\nak_names = ["xyz"]\n')


def test_tcb_status_and_min_tcb():
    sgx = ap.Appraisal(evidence_type="sgx", measurement=M1, tcb_status="SWHardeningNeeded")
    assert "TCB status SWHardeningNeeded is not accepted" in evaluate(default_policy(), sgx, now=NOW).reasons[0]
    relaxed = parse_policy('[sgx]\ntcb_statuses = ["UpToDate", "SWHardeningNeeded"]\n')
    result = evaluate(relaxed, sgx, now=NOW)
    assert result.accepted and result.components["platform"] == "warning"
    snp = ap.Appraisal(evidence_type="snp", tcb={"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115})
    policy = parse_policy("[snp]\nmin_tcb = {bootloader = 3, snp = 9}\n")
    assert evaluate(policy, snp, now=NOW).reasons == ("TCB snp level 8 is below the policy's minimum 9",)


def test_freshness_nonce_report_data_and_age():
    policy = parse_policy('[freshness]\nnonce = "required"\nmax_age = "2m"\n[cove]\n')
    assert evaluate(policy, cove(), nonce=b"N" * 16, now=NOW + timedelta(seconds=100)).accepted
    assert "requires a nonce" in evaluate(policy, cove(), now=NOW).reasons[0]
    assert "does not start with the nonce" in evaluate(policy, cove(), nonce=b"M" * 16, now=NOW).reasons[0]
    old = evaluate(policy, cove(), nonce=b"N" * 16, now=NOW + timedelta(minutes=3))
    assert old.reasons == ("evidence is 180s old; the policy allows at most 120s",)
    future = evaluate(policy, cove(), nonce=b"N" * 16, now=NOW - timedelta(minutes=5))
    assert "in the future" in future.reasons[0]
    rd = cove().report_data
    assert evaluate(default_policy(), cove(), report_data=rd, now=NOW).accepted
    bad = evaluate(default_policy(), cove(), report_data=b"x" * 64, now=NOW)
    assert bad.reasons == ("report data does not match the expected value",)
    timeless = ap.Appraisal(evidence_type="sgx", tcb_status="UpToDate", report_data=bytes(64))
    assert "carries no time" in evaluate(parse_policy("[freshness]\nmax_age = 5\n"), timeless, now=NOW).reasons[0]


def test_max_platform_age():
    policy = parse_policy('[cove]\nmax_platform_age = "1d"\n')
    assert evaluate(policy, cove(), now=NOW + timedelta(hours=23)).accepted
    assert "platform endorsement is" in evaluate(policy, cove(), now=NOW + timedelta(days=2)).reasons[0]


def test_rejection_lists_every_reason():
    policy = parse_policy(f'[cove]\nmeasurements = ["{M2.hex()}"]\n')
    result = evaluate(policy, cove(debug=True, platform_root="self-certified"), nonce=b"zz", now=NOW)
    assert len(result.reasons) == 4
    assert result.components == {"platform": "contraindicated", "enclave": "contraindicated"}


def _ca_pem(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "test CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert


def test_certificates_from_files_and_inline(tmp_path):
    path, cert = _ca_pem(tmp_path)
    der = cert.public_bytes(serialization.Encoding.DER)
    policy_file = tmp_path / "p.toml"
    policy_file.write_text(f'name = "prod"\n[cove]\nek_ca = ["ca.pem"]\nak_ca = """{path.read_text()}"""\n')
    policy = load_policy(policy_file)
    assert policy.rules["cove"].ek_ca == (der,) and policy.rules["cove"].ak_ca == (der,)
    assert policy.rules["cove"].pem("ek_ca") == path.read_bytes()
    assert policy.id == "prod"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[cove]\nmeasurments = []\n", "cove.measurments: not a setting for cove evidence"),
        ('[cove]\nmeasurements = ["xyz"]\n', "cove.measurements[0]: must be a hex string"),
        ('[cove]\ndebug = "no"\n', "cove.debug: must be true or false"),
        ("[tpm]\ndebug = true\n", "tpm.debug: not a setting for tpm evidence"),
        ('[sgx]\ntcb_statuses = ["Fine"]\n', "unknown TCB status 'Fine'"),
        ('[freshness]\nmax_age = "soon"\n', "freshness.max_age: must be seconds"),
        ("[freshness]\nmax_age = nan\n", "freshness.max_age: must be a finite number"),  # NaN was accepted: never stale
        ("[cove]\nmax_platform_age = inf\n", "cove.max_platform_age: must be a finite number"),  # inf was accepted
        ('[cove]\nmeasurements = "' + "00" * 32 + '"\n', "cove.measurements: must be a list, not str"),
        ('[cove]\nmeasurements = ["00 11"]\n', "cove.measurements[0]: must be a hex string"),
        ('types = ["cove", 5]\n', "types: must be a list of non-empty strings"),
        ("name = 7\n", "name: must be a string, not int"),
        ('[[cove.signers]]\nsigner = "zz"\n', "cove.signers[0].signer: must be a hex string"),
        ("[cove]\nek_ca = 5\n", "cove.ek_ca: must be a list, not int"),
        ('[tdx.rtmrs]\n0 = "00"\n', "tdx.rtmrs.0: must be 48 bytes (96 hex digits), not 1"),
        ("[freshness]\nnonce = true\n", "freshness.nonce"),
        ("version = 2\n", "policy version 2 is not supported"),
        ('types = ["arm"]\n', "unknown evidence type 'arm'"),
        ('[cove]\nruntime_hashes = ["abcd"]\n', "must be 32 bytes"),
        ('[cove.pcrs.md5]\n0 = "00"\n', "unknown PCR bank"),
        ('[cove.pcrs.sha256]\n24 = "00"\n', "index must be from 0 to 23"),
        ("[[cove.signers]]\nproduct_id = 1\n", "names no signer"),
        ('[cove]\nek_ca = ["missing.pem"]\n', "cannot read certificate file missing.pem"),
        ("[snp]\nmin_tcb = {bios = 1}\n", "unknown TCB component"),
        ("surprise = 1\n", "surprise: unknown setting"),
        ("not toml at all [", "not valid TOML or JSON"),
        ("[1, 2]", "a policy must be a table"),
        ('[cove]\ninit_data_digests = ["' + "00" * 32 + '"]\n', "cove.init_data_digests: not a setting for cove"),
        ('[sgx.init_data]\nk = ["v"]\n', "sgx.init_data: not a setting for sgx"),
        ('[tdx]\ninit_data_digests = ["abcd"]\n', "must be a SHA-256, SHA-384 or SHA-512 digest"),
        ('[snp]\ninit_data = {k = "v"}\n', "snp.init_data.k: must be a list"),
        ("[snp]\ninit_data = {k = []}\n", "snp.init_data.k: lists no accepted value"),
        ("[tpm]\ninit_data = []\n", "tpm.init_data: must be a table of data key"),
    ],
)
def test_parse_errors_are_one_clear_line(tmp_path, text, fragment):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert fragment in err.value.line() and "\n" not in err.value.line()
    assert err.value.line().startswith(str(path))


def test_missing_policy_file(tmp_path):
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "nope.toml")


def test_policy_id_is_stable_digest():
    a = parse_policy('[cove]\nmeasurements = ["00ff"]\n')
    b = parse_policy('{"cove": {"measurements": ["00ff"]}}')
    assert a.id == b.id and a.id.startswith("sha256:")
    assert parse_policy("[cove]\n").id != a.id


INIT = bytes.fromhex("ab" * 32)
INIT_POLICY = (
    'types = ["tdx", "tpm"]\n[tdx]\ninit_data_digests = ["' + "ab" * 32 + '"]\n'
    '[tdx.init_data]\n"policy.rego" = ["allow", "allow-all"]\nlevel = [3]\n'
    '[tpm]\ninit_data_digests = ["' + "ab" * 32 + '"]\n'
)


@pytest.mark.parametrize(
    "kind, init_data, data, reasons",
    [
        ("tdx", INIT, {"policy.rego": "allow-all", "level": 3}, []),
        ("tpm", INIT, {}, []),
        ("tdx", None, {}, ["the evidence carries no init-data; the policy requires it"]),
        ("tpm", None, {}, ["the evidence carries no init-data; the policy requires it"]),
        (
            "tdx",
            b"\xcd" * 32,
            {"policy.rego": "deny", "level": "3"},
            [
                "init-data digest " + "cd" * 32 + " is not one the policy accepts",
                "init-data data key 'level' has a value the policy does not accept",
                "init-data data key 'policy.rego' has a value the policy does not accept",
            ],
        ),
        ("tdx", INIT, {"level": 3}, ["init-data has no data key 'policy.rego'; the policy requires one"]),
    ],
)
def test_init_data_rules(kind, init_data, data, reasons):
    """Digest and data values of the init-data bound to the evidence; every failing rule is a reason."""
    claims = ap.Appraisal(
        evidence_type=kind,
        measurement=M1,
        tcb_status="UpToDate" if kind == "tdx" else None,
        init_data=init_data,
        init_data_claims=data,
    )
    result = evaluate(parse_policy(INIT_POLICY), claims, now=NOW)
    assert result.accepted == (not reasons)
    assert [r.split(" (sha256")[0] for r in result.reasons] == reasons
    if reasons:  # the enclave's init-data; a bare TPM quote has only a platform
        assert result.components["enclave" if kind == "tdx" else "platform"] == "contraindicated"


def test_init_data_rules_change_the_policy_id():
    one = parse_policy(INIT_POLICY)
    assert parse_policy(INIT_POLICY).id == one.id
    assert parse_policy(INIT_POLICY.replace("ab" * 32, "ac" * 32)).id != one.id
    assert parse_policy(INIT_POLICY.replace('"allow-all"', '"allow-some"')).id != one.id


def test_policy_text_is_read_up_to_the_cap(tmp_path):
    """What `cove kbs serve --policy` reads: never past 1 MiB, so /dev/zero cannot hang the broker."""
    from cove.attest.policy import read_policy_text

    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * ((1 << 20) + 1))
    for path in ("/dev/zero", big):
        with pytest.raises(PolicyError, match="larger than 1 MiB"):
            read_policy_text(path)
    assert read_policy_text(_write(tmp_path, "[cove]\n")) == "[cove]\n"


# The real vectors, appraised: the policy reads each verifier's claims.


def test_real_sgx_vector_status_needs_the_policy_to_allow_it():
    t = datetime(2025, 6, 19, 11, 56, 11, tzinfo=timezone.utc)
    claims = verify_dcap_quote(
        vector("sgx/quote.bin"), collateral("sgx/collateral.json"), vector("intel_sgx_root_ca.pem"), t
    )
    a = ap.from_dcap(claims)
    assert a.evidence_type == "sgx" and len(a.measurement) == 32 and a.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert not evaluate(default_policy(), a, now=t).accepted
    policy = parse_policy(
        '[sgx]\ntcb_statuses = ["ConfigurationAndSWHardeningNeeded"]\n'
        f'measurements = ["{a.measurement.hex()}"]\ndebug = {str(bool(a.debug)).lower()}\n'
    )
    assert evaluate(policy, a, now=t).accepted
    json.dumps(ap.summary(a)) and json.dumps(dict(a.claims))


def test_real_tdx_vector_up_to_date():
    t = datetime(2025, 6, 19, 11, 16, 3, tzinfo=timezone.utc)
    claims = verify_dcap_quote(
        vector("tdx/quote.bin"), collateral("tdx/collateral.json"), vector("intel_sgx_root_ca.pem"), t
    )
    a = ap.from_dcap(claims)
    assert a.evidence_type == "tdx" and len(a.measurement) == 48 and len(a.rtmrs) == 4
    policy = parse_policy(
        f'[tdx]\nmeasurements = ["{a.measurement.hex()}"]\ndebug = true\nrtmrs = {{0 = "{a.rtmrs[0].hex()}"}}\n'
    )
    assert evaluate(policy, a, now=t).accepted
    other = bytes(48) if a.rtmrs[1] != bytes(48) else b"\x01" * 48
    wrong = parse_policy(f'[tdx]\ndebug = true\nrtmrs = {{1 = "{other.hex()}"}}\n')
    assert evaluate(wrong, a, now=t).reasons[0].startswith("RTMR1 is ")


def test_real_snp_vector():
    claims = verify_snp_report(
        vector("snp/report.bin"),
        vector("snp/vcek.der"),
        vector("snp/ask_ark_milan.pem"),
        datetime(2026, 11, 15, tzinfo=timezone.utc),
    )
    a = ap.from_snp(claims)
    assert a.evidence_type == "snp" and set(a.tcb) >= {"bootloader", "tee", "snp", "microcode"}
    policy = parse_policy(
        f'[snp]\nmeasurements = ["{a.measurement.hex()}"]\ndebug = true\nmin_tcb = {{snp = {a.tcb["snp"]}}}\n'
    )
    assert evaluate(policy, a, now=NOW).accepted
    higher = parse_policy(f"[snp]\ndebug = true\nmin_tcb = {{snp = {a.tcb['snp'] + 1}}}\n")
    assert not evaluate(higher, a, now=NOW).accepted


def test_real_tpm_vector_nonce_is_exact():
    nonce = vector("tpm/nonce.txt").strip()
    claims = verify_tpm_quote(
        vector("tpm/quote_attest.bin"),
        vector("tpm/quote_sig.bin"),
        vector("tpm/quote_pcrs.bin"),
        vector("tpm/ak_pub.pem"),
        None,
    )
    a = ap.from_tpm(claims)
    assert evaluate(default_policy(), a, nonce=nonce, now=NOW).accepted
    assert not evaluate(default_policy(), a, nonce=nonce[:-1], now=NOW).accepted
    pcr16 = a.pcrs["sha256"][16]
    assert evaluate(parse_policy(f'[tpm.pcrs.sha256]\n16 = "{pcr16.hex()}"\n'), a, now=NOW).accepted
    assert not evaluate(parse_policy(f'[tpm.pcrs.sha256]\n16 = "{"00" * 32}"\n'), a, now=NOW).accepted


def test_the_documented_example_parses():
    from tests.conftest import ROOT

    text = (ROOT / "docs" / "policy.md").read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    policy = parse_policy(example)
    assert policy.name == "payments-prod" and policy.freshness.nonce_required
    assert policy.types == frozenset({"cove", "sgx", "snp"})
    assert policy.rules["cove"].signers[0].min_svn == 3 and policy.rules["snp"].min_tcb["snp"] == 8


def test_policy_id_covers_the_anchors_bytes_not_their_paths(tmp_path):
    """Same path, other certificate: another id. Same certificate, inline or by path: the same id."""
    intel, ark = vector("intel_sgx_root_ca.pem"), vector("snp/ask_ark_milan.pem")
    (tmp_path / "root.pem").write_bytes(intel)
    by_path = load_policy(_write(tmp_path, '[sgx]\nroots = ["root.pem"]\n'))
    inline = parse_policy(f"[sgx]\nroots = [{json.dumps(intel.decode())}]\n")
    assert by_path.id == inline.id and by_path.id.startswith("sha256:")
    (tmp_path / "root.pem").write_bytes(ark)
    assert load_policy(tmp_path / "policy.toml").id != by_path.id


def _write(tmp_path, text: str):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("item", ["/etc/hostname", "root.pem", "../../etc/ssl/certs/ca-certificates.crt"])
def test_policy_from_elsewhere_names_no_files(item):
    with pytest.raises(PolicyError, match="is a file name; this policy must carry its certificates inline"):
        parse_policy(f'[tdx]\nroots = ["{item}"]\n', allow_paths=False)
    intel = vector("intel_sgx_root_ca.pem").decode()
    assert parse_policy(f"[tdx]\nroots = [{json.dumps(intel)}]\n", allow_paths=False).rules["tdx"].roots
