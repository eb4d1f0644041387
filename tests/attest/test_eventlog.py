"""TCG2 event logs: parse and replay, cross-checked with tpm2_eventlog; fuzzed."""

from __future__ import annotations

import hashlib
import re
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cove.attest.errors import VerificationError
from cove.attest.eventlog import event_log_check, parse_event_log, replay
from eventlog_writer import log
from tests.conftest import require

MEASUREMENTS = [
    (0, b"firmware"),
    (1, b"config"),
    (4, b"bootloader"),
    (7, b"secure boot"),
    (4, b"kernel"),
    (9, b"initrd"),
]


def extend_all(items, bank="sha256", locality=0):
    values = {}
    for pcr, data in items:
        size = hashlib.new(bank).digest_size
        start = bytes(size - 1) + bytes([locality]) if pcr == 0 else bytes(size)
        values[pcr] = hashlib.new(bank, values.get(pcr, start) + hashlib.new(bank, data).digest()).digest()
    return values


def test_parse_and_replay():
    parsed = parse_event_log(log(MEASUREMENTS))
    assert parsed.banks == {"sha1": 20, "sha256": 32} and len(parsed.events) == len(MEASUREMENTS)
    assert replay(parsed)["sha256"] == extend_all(MEASUREMENTS)
    assert replay(parsed)["sha1"] == extend_all(MEASUREMENTS, "sha1")


def test_startup_locality_sets_pcr0_start():
    parsed = parse_event_log(log(MEASUREMENTS, locality=3))
    assert parsed.startup_locality == 3
    assert replay(parsed)["sha256"][0] == extend_all(MEASUREMENTS, locality=3)[0]


def test_replay_matches_tpm2_eventlog(tmp_path):
    tool = require("tpm2_eventlog")
    path = tmp_path / "log.bin"
    path.write_bytes(log(MEASUREMENTS))
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, check=True).stdout
    bank = out[out.index("pcrs:") :]
    sha256 = bank[bank.index("sha256:") :]
    theirs = {int(i): bytes.fromhex(v) for i, v in re.findall(r"^\s+(\d+)\s*:\s*0x([0-9A-Fa-f]{64})$", sha256, re.M)}
    assert theirs == replay(parse_event_log(log(MEASUREMENTS)))["sha256"]


def test_check_against_quoted_values():
    check = event_log_check(log(MEASUREMENTS))
    good = {"sha256": extend_all(MEASUREMENTS) | {23: b"\x01" * 32}}  # PCRs the log does not cover are left alone
    check(good)
    bad = {"sha256": good["sha256"] | {4: bytes(32)}}
    with pytest.raises(VerificationError, match="event log replay gives PCR sha256:4"):
        check(bad)


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "truncated"),
        (log([])[:-1], "truncated"),
        (b"\x01" + log([])[1:], "crypto-agile Spec ID"),
        (log([(24, b"x")]), "names PCR 24"),
    ],
)
def test_malformed_logs(data, fragment):
    with pytest.raises(VerificationError) as err:
        parse_event_log(data)
    assert fragment in err.value.message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.integers(0, 600), st.binary(max_size=8))
def test_fuzz(noise, pos, junk):
    seed = log(MEASUREMENTS)
    for data in (noise, seed[:pos] + junk + seed[pos + len(junk) :], seed[:pos]):
        try:
            replay(parse_event_log(data))
        except VerificationError:
            pass
