"""`cove verify` on the real hardware vectors: valid inside the collateral windows, refused today, with reasons."""

from __future__ import annotations

import json

import pytest

from cove.attest import verifier
from cove.attest.errors import VerificationError
from tests.attest.attest_vectors import VECTORS
from tests.conftest import error_line

SGX_T = "2025-06-19T12:56:11Z"  # one hour after the TCB info's issueDate
TDX_T = "2025-06-19T12:16:03Z"


@pytest.mark.parametrize(
    "path, kind",
    [("sgx/quote.bin", "sgx"), ("tdx/quote.bin", "tdx"), ("snp/report.bin", "snp"), ("tpm/quote_attest.bin", "tpm")],
)
def test_detect(path, kind):
    assert verifier.detect((VECTORS / path).read_bytes()) == kind


def test_detect_refuses_unknown_data():
    with pytest.raises(VerificationError, match="not recognized"):
        verifier.detect(b"hello world" * 10)


def write_policy(tmp_path, text: str):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_sgx(cove, tmp_path):
    args = ["verify", VECTORS / "sgx/quote.bin", "--collateral", VECTORS / "sgx/collateral.json"]
    denied = cove(*args, "--time", SGX_T)
    assert denied.returncode == 6
    assert "TCB status ConfigurationAndSWHardeningNeeded is not accepted" in error_line(denied)
    assert "valid sgx evidence" in denied.stdout
    policy = write_policy(tmp_path, '[sgx]\ntcb_statuses = ["ConfigurationAndSWHardeningNeeded"]\n')
    ok = cove.ok(*args, "--time", SGX_T, "--policy", policy, "--json")
    result = json.loads(ok.stdout)
    assert result["accepted"] and result["claims"]["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    assert result["components"]["platform"] == "warning"
    today = cove(*args, "--policy", policy)
    assert today.returncode == 5 and "CRL expired at" in error_line(today)


def test_tdx(cove, tmp_path):
    args = ["verify", VECTORS / "tdx/quote.bin", "--collateral", VECTORS / "tdx/collateral.json"]
    ok = cove.ok(*args, "--time", TDX_T, "--json")
    result = json.loads(ok.stdout)
    assert result["accepted"] and result["claims"]["tcb_status"] == "UpToDate" and len(result["claims"]["rtmrs"]) == 4
    mrtd = result["claims"]["measurement"]
    policy = write_policy(tmp_path, f'[tdx]\nmeasurements = ["{"00" * 48}"]\n')
    other = cove(*args, "--time", TDX_T, "--policy", policy)
    assert other.returncode == 6 and f"measurement {mrtd} is not one the policy accepts" in error_line(other)
    outdated = cove(
        "verify",
        VECTORS / "tdx/quote_outdated.bin",
        "--collateral",
        VECTORS / "tdx/collateral_outdated.json",
        "--time",
        "2026-02-18T11:58:51Z",
    )
    assert outdated.returncode == 5 and "matches no TCB level" in error_line(outdated)
    today = cove(*args)
    assert today.returncode == 5 and "expired at" in error_line(today)


def test_snp(cove, tmp_path):
    args = ["verify", VECTORS / "snp/report.bin", "--vcek", VECTORS / "snp/vcek.der", "--time", "2026-01-01T00:00:00Z"]
    denied = cove(*args)
    assert denied.returncode == 6 and "debug enclave" in error_line(denied)  # the vector's guest policy allows debug
    policy = write_policy(tmp_path, "[snp]\ndebug = true\nmin_tcb = {snp = 5, microcode = 68}\n")
    assert cove(*args, "--policy", policy).returncode == 0
    policy.write_text("[snp]\ndebug = true\nmin_tcb = {snp = 6}\n")
    low = cove(*args, "--policy", policy)
    assert low.returncode == 6 and "TCB snp level 5 is below the policy's minimum 6" in error_line(low)
    genoa = cove(*args, "--ask-ark", VECTORS / "snp/ask_ark_genoa.pem", "--policy", policy)
    assert genoa.returncode == 5 and error_line(genoa).startswith("cove: error: snp: ")
    expired = cove(
        "verify", VECTORS / "snp/report.bin", "--vcek", VECTORS / "snp/vcek.der", "--time", "2031-01-01T00:00:00Z"
    )
    assert expired.returncode == 5 and "expired at" in error_line(expired)


def test_tpm(cove):
    nonce = (VECTORS / "tpm/nonce.txt").read_bytes().strip()
    args = [
        "verify",
        VECTORS / "tpm/quote_attest.bin",
        "--tpm-sig",
        VECTORS / "tpm/quote_sig.bin",
        "--tpm-pcrs",
        VECTORS / "tpm/quote_pcrs.bin",
        "--ak",
        VECTORS / "tpm/ak_pub.pem",
    ]
    result = json.loads(cove.ok(*args, "--nonce", nonce.hex(), "--json").stdout)
    assert result["evidence_type"] == "tpm" and "16" in result["claims"]["pcrs"]["sha256"]
    # extraData is signed evidence: a wrong nonce is invalid evidence (exit 5), never "valid" then refused.
    wrong = cove(*args, "--nonce", (nonce + b"x").hex())
    assert wrong.returncode == 5 and "tpm: quote extraData does not match the nonce" in error_line(wrong)
    assert "valid tpm evidence" not in wrong.stdout
    as_json = json.loads(cove(*args, "--nonce", (nonce + b"x").hex(), "--json").stdout)
    assert as_json["valid"] is False and "extraData" in as_json["error"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["verify", "/nonexistent"], "evidence /nonexistent: not found"),
        (["verify", "{v}/sgx/quote.bin"], "sgx: no collateral given"),
        (
            ["verify", "{v}/sgx/quote.bin", "--collateral", "{v}/sgx/collateral.json", "--time", "yesterday"],
            "not an ISO 8601",
        ),
        (["verify", "{v}/sgx/quote.bin", "--nonce", "xyz"], "--nonce xyz: not hex"),
        (["verify", "{v}/README.md"], "evidence type not recognized"),
        (["verify", "{v}/sgx/quote.bin", "--policy", "/nonexistent.toml"], "policy /nonexistent.toml: not found"),
    ],
)
def test_user_errors_are_one_line(cove, args, fragment):
    result = cove(*[a.format(v=VECTORS) for a in args])
    assert result.returncode != 0
    assert fragment in error_line(result)


def test_json_output_on_invalid_evidence(cove):
    result = cove("verify", VECTORS / "sgx/quote.bin", "--collateral", VECTORS / "sgx/collateral.json", "--json")
    assert result.returncode == 5
    assert json.loads(result.stdout) == {
        "valid": False,
        "accepted": False,
        "error": error_line(result)[len("cove: error: ") :],
    }


@pytest.mark.parametrize(
    "args, code, fragment",
    [
        (["verify", "/dev/zero"], 5, "evidence /dev/zero: larger than 4 MiB"),
        (["verify", "-"], 5, "evidence -: larger than 4 MiB"),
        (["verify", "{v}/snp/report.bin", "--vcek", "/dev/zero"], 5, "VCEK /dev/zero: larger than 4 MiB"),
        (["verify", "{v}/sgx/quote.bin", "--collateral", "/dev/zero"], 5, "collateral /dev/zero: larger than 4 MiB"),
        (["verify", "{v}/snp/report.bin", "--policy", "/dev/zero"], 2, "policy /dev/zero: larger than 1 MiB"),
    ],
)
def test_endless_inputs_are_capped_while_reading(cove, args, code, fragment):
    """`cove verify /dev/zero` returns at once: inputs are read up to a cap, never to their end."""
    import subprocess

    with open("/dev/zero", "rb") as zero:
        result = subprocess.run(
            cove.popen_args(*[a.format(v=VECTORS) for a in args]),
            stdin=zero,
            capture_output=True,
            text=True,
            timeout=30,
            env=cove.env,
        )
    assert result.returncode == code, result.stderr
    assert fragment in error_line(result)
