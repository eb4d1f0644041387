"""Files written by Gramine open, read and update correctly in Cove."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from cove.fs import FileIntegrityError, ProtectedFile
from cove.fs.layout import NODE_SIZE, node_count

VECTORS = Path(__file__).parent / "vectors"
SPEC = json.loads((VECTORS / "vectors.json").read_text())
KEY = bytes.fromhex(SPEC["key"])
LOGICAL = SPEC["logical_path"]


def pattern(n: int) -> bytes:
    return bytes((7 * i + 3) % 251 for i in range(n))


@pytest.mark.parametrize("vec", SPEC["vectors"], ids=lambda v: v["file"])
def test_gramine_file_reads(vec):
    path = VECTORS / vec["file"]
    assert path.stat().st_size == node_count(vec["size"]) * NODE_SIZE
    with ProtectedFile.open(path, KEY, LOGICAL, "r") as f:
        assert f.size() == vec["size"]
        assert f.read(0, vec["size"] + 10) == pattern(vec["size"])


@pytest.mark.parametrize("vec", SPEC["vectors"], ids=lambda v: v["file"])
def test_gramine_file_updates(vec, tmp_path):
    path = tmp_path / vec["file"]
    shutil.copy(VECTORS / vec["file"], path)
    expect = bytearray(pattern(vec["size"]))
    with ProtectedFile.open(path, KEY, LOGICAL, "r+") as f:
        f.write(vec["size"] // 2, b"cove")
        expect[vec["size"] // 2:vec["size"] // 2 + 4] = b"cove"
    with ProtectedFile.open(path, KEY, LOGICAL, "r") as f:
        assert f.read(0, len(expect) + 1) == bytes(expect)


def test_gramine_truncated_file_extends_with_zeros(tmp_path):
    """Gramine leaves stale bytes after a truncation inside a node; they must not resurface."""
    path = tmp_path / "t.pf"
    shutil.copy(VECTORS / "truncated.pf", path)
    with ProtectedFile.open(path, KEY, LOGICAL, "r+") as f:
        f.truncate(20_000)
        assert f.read(0, 20_000) == pattern(10_000) + bytes(10_000)


def test_gramine_file_bound_path_and_key_are_checked():
    with pytest.raises(FileIntegrityError, match="path mismatch"):
        ProtectedFile.open(VECTORS / "small.pf", KEY, "data/other.bin", "r")
    with pytest.raises(FileIntegrityError, match="metadata MAC mismatch"):
        ProtectedFile.open(VECTORS / "small.pf", os.urandom(16), LOGICAL, "r")
