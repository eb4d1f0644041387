"""The enclave identity the runtime hands the /dev/attestation server on stdin is read through cove.decode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cove.platform.devattest_server import claims_from_json

IDENTITY = {
    "measurement": "ab" * 32,
    "signer": "cd" * 32,
    "product_id": 1,
    "svn": 2,
    "debug": False,
    "backend": "direct",
    "isolation": "bwrap",
    "instance_id": "t-1",
}
HOSTILE = {
    "deep nesting": ("[" * 10_000 + "]" * 10_000, "not valid JSON"),  # was a RecursionError traceback
    "trailing garbage": (json.dumps(IDENTITY) + " {}", "not valid JSON"),
    "wrong top-level type": (json.dumps([IDENTITY]), "must be a map"),  # was a TypeError traceback
    "wrong field type": (json.dumps(dict(IDENTITY, debug="false")), "debug must be true or false"),  # was debug on
    "out of range": (json.dumps(dict(IDENTITY, svn=70000)), "svn must be an integer from 0 to 65535"),
    "not hex": (json.dumps(dict(IDENTITY, measurement="zz")), "measurement is not hex"),
}


def test_the_runtime_identity_reads_back() -> None:
    claims = claims_from_json(json.loads(json.dumps(IDENTITY)))
    assert (claims.measurement, claims.svn, claims.debug, claims.instance_id) == (
        bytes.fromhex("ab" * 32),
        2,
        False,
        "t-1",
    )


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_identity_is_one_line_and_exit_2(tmp_path, platform_paths, case) -> None:
    """Before anything is mounted: one line on stderr, exit 2, no traceback."""
    text, words = HOSTILE[case]
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "cove.platform.devattest_server", str(mountpoint)],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.count("\n") == 1 and words in result.stderr and "Traceback" not in result.stderr
    assert not any(mountpoint.iterdir())
