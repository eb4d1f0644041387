"""Files written by Gramine open, read and update correctly in Cove."""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import subprocess
from pathlib import Path

import pytest

from cove.fs import FileIntegrityError, ProtectedFile
from cove.fs.layout import NODE_SIZE, node_count
from tests.conftest import COVE

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
        expect[vec["size"] // 2 : vec["size"] // 2 + 4] = b"cove"
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


# Gramine's runtime binds a protected file to its normalized *host* path: for
# a mount `{ path = "/secrets", uri = "file:./data//", type = "encrypted" }`
# the enclave opens /secrets/vec.bin, and libos_fs_encrypted.c passes the URI
# without `file:`, normalized (get_norm_path), to pf_open: "data/vec.bin".
GRAMINE_MOUNT_URI, ENCLAVE_PATH = "file:./data//", "/secrets/vec.bin"


def gramine_bound_path(uri: str, name: str) -> str:
    """What Gramine binds a file NAME under an encrypted mount with host URI uri to."""
    return posixpath.normpath(posixpath.join(uri.removeprefix("file:"), name))


def test_gramine_binds_the_normalized_host_path_not_the_enclave_path(tmp_path):
    bound = gramine_bound_path(GRAMINE_MOUNT_URI, "vec.bin")
    assert bound == LOGICAL  # the vectors were written as Gramine would for that mount
    key_file = tmp_path / "k.key"
    key_file.write_bytes(KEY)
    vector = str(VECTORS / "small.pf")

    def cove_fs(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([COVE, "fs", *args], capture_output=True, text=True, timeout=60)

    # Read with the host path Gramine bound: fine. With the path the enclave opened: refused.
    ok = cove_fs("decrypt", "--key", f"file:{key_file}", "--path", bound, vector, str(tmp_path / "out"))
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out").read_bytes() == pattern(100)
    wrong = cove_fs("decrypt", "--key", f"file:{key_file}", "--path", ENCLAVE_PATH, vector, str(tmp_path / "out2"))
    assert wrong.returncode != 0 and "path mismatch" in wrong.stderr
    assert not (tmp_path / "out2").exists()

    # A file made for that Gramine mount: encrypt with --path equal to Gramine's host-side path.
    (tmp_path / "plain").write_bytes(pattern(5000))
    made = cove_fs(
        "encrypt", "--key", f"file:{key_file}", "--path", bound, str(tmp_path / "plain"), str(tmp_path / "vec.bin")
    )
    assert made.returncode == 0, made.stderr
    with ProtectedFile.open(tmp_path / "vec.bin", KEY, bound, "r") as f:
        assert f.read(0, 5001) == pattern(5000)
    with pytest.raises(FileIntegrityError, match="path mismatch"):
        ProtectedFile.open(tmp_path / "vec.bin", KEY, ENCLAVE_PATH, "r")
