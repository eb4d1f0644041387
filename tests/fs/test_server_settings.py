"""The FUSE server's settings on stdin are read through cove.decode: hostile bytes end in one error line."""

from __future__ import annotations

import subprocess
import sys

import cbor2
import pytest

from cove.errors import CoveError
from cove.fs.server import read_settings

GOOD = {
    "volume": "/v",
    "key": "file:/k",
    "label": "/data",
    "writable": True,
    "mountpoint": "/m",
    "identity": {"measurement": b"\x01" * 32, "signer": b"\x02" * 32, "product_id": 1, "svn": 2, "debug": False},
    "keks": {2: b"\x03" * 32},
    "extra_dirs": ["proc"],
}


def test_the_settings_a_launcher_writes_are_read_back() -> None:
    settings = read_settings(cbor2.dumps(GOOD))
    assert (settings.volume, settings.writable, settings.create, settings.anchor) == ("/v", True, False, "auto")
    assert settings.identity is not None and settings.identity.svn == 2
    assert settings.keks == {2: b"\x03" * 32} and settings.extra_dirs == ("proc",) and settings.image is None


HOSTILE = [
    (cbor2.dumps(GOOD) + b"\x00", "trailing bytes"),  # the old cbor2.loads ignored them
    (cbor2.dumps([GOOD]), "must be a map"),  # the old code raised TypeError on settings["volume"]
    (cbor2.dumps(dict(GOOD, writable="yes")), "writable must be true or false"),
    (cbor2.dumps(dict(GOOD, identity={"measurement": b"x"})), "identity lacks signer"),
    (cbor2.dumps(dict(GOOD, keks={"2": "k"})), "keks must map key versions to byte strings"),
    (cbor2.dumps(dict(GOOD, extra_dirs=[1])), "extra_dirs must be a list of text strings"),
    (cbor2.dumps(dict(GOOD, surprise=1)), "unknown field 'surprise'"),
    (cbor2.dumps(dict(GOOD, image=cbor2.dumps([["a"]]))), "image listing entry 0 must be a list of six items"),
    (b"\x81" * 5000 + b"\x80", "not valid CBOR"),  # nested deeper than cbor2's limit
]


@pytest.mark.parametrize("data,problem", HOSTILE[:-2], ids=[p for _, p in HOSTILE[:-2]])
def test_hostile_settings_are_one_cove_error(data: bytes, problem: str) -> None:
    with pytest.raises(CoveError, match=problem):
        read_settings(data)


@pytest.mark.parametrize("data,problem", HOSTILE, ids=[p for _, p in HOSTILE])
def test_the_server_process_answers_hostile_settings_with_one_line(data: bytes, problem: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "cove.fs.server"], input=data, capture_output=True, timeout=60)
    assert proc.returncode == 2, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and problem in lines[0], lines
    assert b"Traceback" not in proc.stderr
