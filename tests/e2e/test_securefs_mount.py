"""Encrypted mounts inside a running enclave: plain POSIX files inside, only ciphertext outside.

The enclave runs Debian's python3.11 with tests/fs/enclave_fsprobe.py; the
volume is served by a FUSE server outside the sandbox.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from tests.conftest import error_line, require
from tests.fs.securefs_enclave import make_python_enclave, mount_block, platform_env
from tests.fs.securefs_helpers import BIG, build_tamper_volume, content, running_swtpm


@pytest.fixture(scope="module")
def enclave(cove, tmp_path_factory):
    base = tmp_path_factory.mktemp("securefs")
    return make_python_enclave(cove, base, platform_env(base))


@pytest.fixture
def fresh(enclave):
    enclave.reset_state()
    yield enclave
    enclave.reset_state()


def test_posix_operations_and_persistence(fresh):
    fresh.configure(mount_block())
    report = fresh.probe_json("posix", "/data")
    assert report["read"] == "hello, enclave\n"
    assert report["excl"] and report["hole"] and report["zero_after_extend"]
    assert report["size_after_hole"] == 5_000_004
    assert report["cross"] == "fe585901"
    assert report["size_after_truncate"] == 10_000
    assert report["rename_over"] == "A"
    assert report["rename_dir"] == ["deeper"]
    assert report["rmdir_not_empty"] and report["unlinked"] and report["isdir_unlink"] and report["enoent"]
    assert report["ghost"] == "boo"
    assert report["symlink"] == "dir/hello.txt" and report["via_link"] == "hello, enclave\n"
    assert report["mode"] == "0o640"
    assert report["nlink_dir"] == 2
    assert report["hardlink_refused"]
    assert report["listing"] == ["append.log", "b", "big.bin", "dir", "link"]
    assert report["statvfs"] == 4096
    again = fresh.probe_json("persisted", "/data")
    assert again["hello"] == "hello, enclave\n"
    assert again["big"] == [20_000, True, True]
    assert again["lines"] == 100
    assert again["listing"] == report["listing"]
    assert again["mode"] == "0o640"


def test_host_sees_only_ciphertext(fresh):
    fresh.configure(mount_block())
    fresh.probe_json("posix", "/data")
    volume = fresh.state / "data"
    blob = b"".join(p.read_bytes() for p in volume.rglob("*") if p.is_file())
    assert len(blob) > 20_000
    for needle in (b"hello, enclave", b"line 42", b"append.log", b"big.bin", bytes(range(256))[:64]):
        assert needle not in blob, needle
    names = {p.name for p in volume.rglob("*")}
    assert not names & {"dir", "hello.txt", "append.log", "big.bin", "b", "link"}


def test_tampered_volume_gives_eio_inside(fresh, tmp_path, monkeypatch):
    key_file = tmp_path / "volume.key"
    key = os.urandom(16)
    key_file.write_bytes(key)
    monkeypatch.setenv("COVE_PLATFORM_DIR", fresh.env["COVE_PLATFORM_DIR"])
    expected = build_tamper_volume(fresh.state / "data", key, "/data")
    fresh.configure(mount_block(key=f"file:{key_file}", options='rollback = "file"'))
    result = fresh.probe("readall", "/data")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(found) == set(expected)  # the file added from outside is not there
    for path, outcome in expected.items():
        if outcome != "ok":
            assert found[path] == "errno:EIO", (path, found[path])
    assert found["/cases/intact"] == "sha256:" + hashlib.sha256(content("/cases/intact", BIG)).hexdigest()
    assert found["/cases/small-intact"] == "sha256:" + hashlib.sha256(content("/cases/small-intact", 10)).hexdigest()
    # the server names what failed, once per file, and the added file
    assert "/meta/0000: not a protected file: bad magic" in result.stderr
    assert "added from outside" in result.stderr


def test_volume_rollback_stops_the_enclave(fresh, tmp_path):
    fresh.configure(mount_block())
    assert fresh.run("/bin/sh", "-c", "echo one > /data/v").returncode == 0
    shutil.copytree(fresh.state / "data", tmp_path / "old")
    assert fresh.run("/bin/sh", "-c", "echo two > /data/v").returncode == 0
    shutil.rmtree(fresh.state / "data")
    shutil.copytree(tmp_path / "old", fresh.state / "data")
    result = fresh.run("/bin/cat", "/data/v")
    assert result.returncode == 3
    line = error_line(result)
    assert "encrypted mount /data: volume rolled back" in line and "file anchor" in line
    assert result.stdout == ""


def test_deleted_volume_is_not_silently_recreated(fresh):
    fresh.configure(mount_block())
    assert fresh.run("/bin/sh", "-c", "echo one > /data/v").returncode == 0
    shutil.rmtree(fresh.state / "data")
    result = fresh.run("/bin/cat", "/data/v")
    assert result.returncode != 0
    assert "was deleted" in error_line(result)
    forgot = fresh.cove("fs", "forget", str(fresh.state / "data"), cwd=fresh.root, env=fresh.env)
    assert forgot.returncode == 0, forgot.stderr
    assert fresh.run("/bin/sh", "-c", "ls /data; echo ok").stdout.strip() == "ok"


def test_read_only_mount(fresh):
    fresh.configure(mount_block(key="seal:mrsigner"))
    assert fresh.run("/bin/sh", "-c", "echo kept > /data/f").returncode == 0
    fresh.configure(mount_block(key="seal:mrsigner", writable=False))
    result = fresh.run("/bin/sh", "-c", "cat /data/f; echo x > /data/g")
    assert result.stdout == "kept\n"
    assert result.returncode != 0 and "Read-only file system" in result.stderr


def test_a_non_root_enclave_user_owns_its_files(fresh):
    fresh.configure(mount_block(), {("process", "user"): '"1000:1000"'})
    result = fresh.run("/bin/sh", "-c", "echo mine > /data/f && cat /data/f && /usr/bin/id -u")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["mine", "1000"]


def test_tpm_anchor_detects_rollback_even_with_the_platform_folder_wiped(fresh, tmp_path):
    swtpm = require("swtpm")
    require("tpm2_nvdefine")
    with running_swtpm(tmp_path / "swtpm", swtpm) as tcti:
        env = dict(fresh.env, COVE_TPM_TCTI=tcti)
        fresh.configure(mount_block())  # rollback = "auto": the TPM, since there is one

        def run(*args):
            return fresh.cove("run", *args, cwd=fresh.root, env=env)

        assert run("/bin/sh", "-c", "echo one > /data/v").returncode == 0
        shutil.copytree(fresh.state / "data", tmp_path / "old")
        assert run("/bin/sh", "-c", "echo two > /data/v").returncode == 0
        assert run("/bin/cat", "/data/v").stdout == "two\n"
        shutil.rmtree(fresh.state / "data")
        shutil.copytree(tmp_path / "old", fresh.state / "data")
        shutil.rmtree(os.path.join(fresh.env["COVE_PLATFORM_DIR"], "volumes"))
        result = run("/bin/cat", "/data/v")
        assert result.returncode == 3 and result.stdout == ""
        assert "volume rolled back" in error_line(result) and "tpm anchor" in error_line(result)
