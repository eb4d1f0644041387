"""`cove verify --type tpm` on quotes a real swtpm made, with tpm2-tools' files and an event log."""

from __future__ import annotations

import hashlib
import json
import os
import sys

from cove.platform.tpm2 import Tpm
from tests.conftest import error_line

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "attest"))
from eventlog_writer import log  # noqa: E402

BOOT = [(0, b"firmware"), (2, b"option rom"), (4, b"bootloader"), (7, b"secure boot db"), (4, b"kernel")]


def test_tpm_quote_with_event_log(cove, tpm_platforms, tmp_path):
    paths = tpm_platforms.make()
    config = paths.read_config()
    tpm = Tpm(config.tcti)
    for pcr, data in BOOT:
        tpm.extend(pcr, hashlib.sha256(data).digest())
    nonce = os.urandom(20)
    attest, signature, pcr_file = tpm.quote(config.ak_handle, list(range(8)), nonce)
    files = {
        "attest.bin": attest,
        "sig.bin": signature,
        "pcrs.bin": pcr_file,
        "ak.pub": paths.ak_public.read_bytes(),
        "log.bin": log(BOOT, banks=("sha256",)),
        "bad-log.bin": log(BOOT[:-1], banks=("sha256",)),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    common = ["--tpm-sig", tmp_path / "sig.bin", "--tpm-pcrs", tmp_path / "pcrs.bin", "--ak", tmp_path / "ak.pub"]
    ok = cove(
        "verify",
        tmp_path / "attest.bin",
        *common,
        "--nonce",
        nonce.hex(),
        "--event-log",
        tmp_path / "log.bin",
        "--json",
    )
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["evidence_type"] == "tpm" and result["accepted"]
    pcr4 = result["claims"]["pcrs"]["sha256"]["4"]
    bad_log = cove("verify", tmp_path / "attest.bin", *common, "--event-log", tmp_path / "bad-log.bin")
    assert bad_log.returncode == 5 and "event log replay gives PCR sha256:4" in error_line(bad_log)
    wrong_nonce = cove("verify", tmp_path / "attest.bin", *common, "--nonce", os.urandom(20).hex())
    assert wrong_nonce.returncode == 5 and "extraData does not match the nonce" in error_line(wrong_nonce)
    policy = tmp_path / "p.toml"
    policy.write_text(f'[tpm.pcrs.sha256]\n4 = "{pcr4}"\n')
    assert cove("verify", tmp_path / "attest.bin", *common, "--policy", policy).returncode == 0
    policy.write_text(f'[tpm.pcrs.sha256]\n4 = "{"00" * 32}"\n')
    rejected = cove("verify", tmp_path / "attest.bin", *common, "--policy", policy)
    assert rejected.returncode == 6 and f"PCR sha256:4 is {pcr4}" in error_line(rejected)
    missing = cove("verify", tmp_path / "attest.bin", "--tpm-sig", tmp_path / "sig.bin")
    assert missing.returncode == 5 and "--tpm-pcrs" in error_line(missing)
    flipped = bytearray(attest)
    flipped[-3] ^= 1
    (tmp_path / "flipped.bin").write_bytes(bytes(flipped))
    bad = cove("verify", tmp_path / "flipped.bin", *common)
    assert bad.returncode == 5 and "tpm: quote signature invalid" in error_line(bad)
