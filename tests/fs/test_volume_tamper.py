"""Every change the host makes to a volume at rest is refused, file by file or as a whole."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from cove.fs import FileIntegrityError
from cove.fs.index import KeyPolicy
from cove.fs.volume import Volume, VolumeError, VolumeIntegrityError
from cove.fs.volume_format import ROOT

from securefs_helpers import BIG, build_tamper_volume, content, flip, host_files


@pytest.fixture(autouse=True)
def platform(tmp_path, monkeypatch):
    monkeypatch.setenv("COVE_PLATFORM_DIR", str(tmp_path / "platform"))
    return tmp_path / "platform"


@pytest.fixture(scope="module")
def tampered(tmp_path_factory):
    base = tmp_path_factory.mktemp("tamper")
    old = os.environ.get("COVE_PLATFORM_DIR")
    os.environ["COVE_PLATFORM_DIR"] = str(base / "platform")
    try:
        key = os.urandom(16)
        expected = build_tamper_volume(base / "vol", key, "/data")
    finally:
        if old is None:
            del os.environ["COVE_PLATFORM_DIR"]
        else:
            os.environ["COVE_PLATFORM_DIR"] = old
    return base, key, expected


def test_each_tampered_file_fails_and_intact_ones_read(tampered, monkeypatch):
    base, key, expected = tampered
    monkeypatch.setenv("COVE_PLATFORM_DIR", str(base / "platform"))
    bad = [p for p, outcome in expected.items() if outcome == "bad"]
    assert len(bad) >= 4096 + 12 + 9
    with Volume.open(base / "vol", key, label="/data", writable=False) as volume:
        for path in bad:
            with pytest.raises(FileIntegrityError) as caught:
                volume.read_file(path)
            assert caught.value.message.startswith(path + ":"), caught.value.message
        assert volume.read_file("/cases/intact") == content("/cases/intact", BIG)
        assert volume.read_file("/cases/small-intact") == content("/cases/small-intact", 10)
        problems = volume.verify()
    reported = {line.split(":")[0] for line in problems}
    assert set(bad) <= reported
    assert any("1-0011223344556677-8899aabbccddeeff" in line and "added from outside" in line for line in problems), (
        problems
    )
    assert any(line.startswith("/cases/deleted:") and "missing" in line for line in problems)
    assert "/cases/intact" not in reported


def test_messages_name_what_failed(tampered, monkeypatch):
    base, key, _ = tampered
    monkeypatch.setenv("COVE_PLATFORM_DIR", str(base / "platform"))
    with Volume.open(base / "vol", key, writable=False) as volume:

        def message(path: str) -> str:
            with pytest.raises(FileIntegrityError) as caught:
                volume.read_file(path)
            return caught.value.message

        assert "bad magic" in message("/meta/0000")
        assert "padding is not zero" in message("/meta/4000")
        assert "MAC mismatch" in message("/meta/0100")
        assert "data node 0 (node 2) MAC mismatch" in message("/data/2-0")
        assert "root MHT node (node 1) MAC mismatch" in message("/mht/1-0")
        assert "truncated or extended" in message("/cases/truncated")
        assert "truncated or extended" in message("/cases/extended-node")
        assert "path mismatch" in message("/cases/moved-over")
        assert "root MAC mismatch" in message("/cases/rolled-back")
        assert "missing" in message("/cases/deleted")


def test_added_file_cannot_be_seen(tampered, monkeypatch):
    base, key, expected = tampered
    monkeypatch.setenv("COVE_PLATFORM_DIR", str(base / "platform"))
    with Volume.open(base / "vol", key, writable=False) as volume:
        assert {path for path, node in volume.walk() if node.kind == "f"} == set(expected)


@pytest.fixture
def volume_dir(tmp_path):
    key = os.urandom(16)
    path = tmp_path / "vol"
    with Volume.create(path, key, label="/data", policy=KeyPolicy.of("file:/k"), anchor="file") as volume:
        volume.write_file("/a.txt", b"first version")
        volume.write_file("/dir/b.txt", b"b")
    return path, key


def test_whole_volume_rollback_is_detected(volume_dir, tmp_path):
    path, key = volume_dir
    shutil.copytree(path, tmp_path / "old")
    with Volume.open(path, key) as volume:
        volume.write_file("/a.txt", b"second version")
    shutil.rmtree(path)
    shutil.copytree(tmp_path / "old", path)
    with pytest.raises(
        VolumeIntegrityError, match="volume rolled back: its root is version 3, the file anchor holds version 4"
    ):
        Volume.open(path, key)


def test_volume_root_rollback_alone_is_detected(volume_dir, tmp_path):
    path, key = volume_dir
    old_root = (path / ROOT).read_bytes()
    with Volume.open(path, key) as volume:
        volume.unlink(volume.root, b"a.txt")
    (path / ROOT).write_bytes(old_root)  # would resurrect a.txt
    with pytest.raises(VolumeIntegrityError, match="rolled back"):
        Volume.open(path, key)


def test_root_file_bytes_flipped(volume_dir):
    path, key = volume_dir
    size = os.path.getsize(path / ROOT)
    original = (path / ROOT).read_bytes()
    for offset in range(0, size, max(1, size // 97)):
        flip(path / ROOT, offset)
        with pytest.raises(VolumeIntegrityError):
            Volume.open(path, key)
        (path / ROOT).write_bytes(original)
    Volume.open(path, key).close()


def test_wrong_key_and_wrong_label(volume_dir):
    path, key = volume_dir
    with pytest.raises(VolumeIntegrityError, match="the key does not open this volume"):
        Volume.open(path, os.urandom(16))
    with pytest.raises(VolumeError, match="belongs to '/data', not '/other'"):
        Volume.open(path, key, label="/other")


def test_swapping_two_volumes_of_one_key_is_refused(tmp_path):
    key = os.urandom(16)
    for name in ("a", "b"):
        Volume.create(tmp_path / name, key, label=f"/{name}", policy=KeyPolicy.of("file:/k"), anchor="file").close()
    os.rename(tmp_path / "a", tmp_path / "tmp")
    os.rename(tmp_path / "b", tmp_path / "a")
    with pytest.raises(VolumeError, match="belongs to '/b', not '/a'"):
        Volume.open(tmp_path / "a", key, label="/a")


def test_missing_anchor_record_is_refused_unless_told(volume_dir, platform):
    path, key = volume_dir
    for record in (platform / "volumes").iterdir():
        record.unlink()
    with pytest.raises(Exception, match="rollback record of this volume .* is missing"):
        Volume.open(path, key)
    with Volume.open(path, key, check_anchor=False, writable=False) as volume:
        assert volume.read_file("/a.txt") == b"first version"


def test_host_sees_no_names_or_content(volume_dir):
    path, key = volume_dir
    with Volume.open(path, key) as volume:
        volume.write_file("/secret-name.txt", b"secret content " * 1000)
    blob = b"".join(p.read_bytes() for p in path.rglob("*") if p.is_file())
    for needle in (b"secret", b"a.txt", b"dir", b"first version"):
        assert needle not in blob
    assert host_files(path) and all(
        re.fullmatch(r"[0-9a-f]+-[0-9a-f]{16}-[0-9a-f]{16}", name) for name in host_files(path)
    )
