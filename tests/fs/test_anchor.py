"""Rollback anchors: the platform file and a real (software) TPM's NV counter."""

from __future__ import annotations

import os
import shutil
import subprocess

import cbor2
import pytest

from cove.fs import anchor
from cove.fs.anchor import Anchor, AnchorError, FileAnchor, TpmAnchor
from cove.fs.index import KeyPolicy
from cove.fs.volume import Volume, VolumeIntegrityError
from tests.conftest import require

from securefs_helpers import running_swtpm


@pytest.fixture(autouse=True)
def platform(tmp_path, monkeypatch):
    monkeypatch.setenv("COVE_PLATFORM_DIR", str(tmp_path / "platform"))
    monkeypatch.delenv("COVE_TPM_TCTI", raising=False)
    return tmp_path / "platform"


@pytest.fixture
def tpm(tmp_path, monkeypatch):
    swtpm = require("swtpm")
    for tool in ("tpm2_nvdefine", "tpm2_nvread", "tpm2_nvwrite", "tpm2_nvincrement", "tpm2_nvundefine", "tpm2_getcap"):
        require(tool)
    with running_swtpm(tmp_path / "swtpm", swtpm) as tcti:
        monkeypatch.setenv("COVE_TPM_TCTI", tcti)
        yield tcti


def _tpm_run(tcti: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, env=dict(os.environ, TPM2TOOLS_TCTI=tcti))


def test_file_anchor_cycle_and_tamper(platform):
    store = FileAnchor(b"\x01" * 16, b"s" * 16, "/vol")
    first = store.create()
    assert first == Anchor(1, anchor.ZERO)
    store.advance(Anchor(2, b"\x02" * 32))
    assert store.read() == Anchor(2, b"\x02" * 32)
    with pytest.raises(AnchorError, match="does not follow"):
        store.advance(Anchor(5, b"\x05" * 32))
    record = cbor2.loads(store.file.read_bytes())
    record["version"] = 1
    store.file.write_bytes(cbor2.dumps(record))
    with pytest.raises(AnchorError, match="does not belong to this volume or was modified"):
        store.read()
    other = FileAnchor(b"\x01" * 16, b"t" * 16, "/vol")  # another secret: not this volume's record
    with pytest.raises(AnchorError):
        other.read()


def test_auto_is_the_platform_file_without_a_tpm():
    assert anchor.choose_kind("auto") == "file"


def test_tpm_anchor_cycle(tpm):
    assert anchor.choose_kind("auto") == "tpm"
    store = TpmAnchor(os.urandom(16), os.urandom(16), "/vol")
    first = store.create()
    assert first.digest == anchor.ZERO and first.version >= 1
    for step in range(1, 4):
        store.advance(Anchor(first.version + step, bytes([step]) * 32))
    assert store.read() == Anchor(first.version + 3, b"\x03" * 32)
    # a fresh store object finds the same state (e.g. after a restart)
    again = TpmAnchor(store.volume_id, store.secret, "/vol", store.counter)
    assert again.read() == Anchor(first.version + 3, b"\x03" * 32)


def test_tpm_advance_cut_between_its_two_steps_completes(tpm):
    store = TpmAnchor(os.urandom(16), os.urandom(16), "/vol")
    first = store.create()
    store._write_record(Anchor(first.version + 1, b"\x07" * 32))  # crash before the increment
    assert store.read() == Anchor(first.version + 1, b"\x07" * 32)
    assert store._read_counter() == first.version + 1


def test_tpm_counter_cannot_be_reset_by_redefining(tpm):
    store = TpmAnchor(os.urandom(16), os.urandom(16), "/vol")
    first = store.create()
    store.advance(Anchor(first.version + 1, b"\x01" * 32))
    store.advance(Anchor(first.version + 2, b"\x02" * 32))
    # the TPM's owner deletes both indexes and defines them again with an auth it knows
    for handle in (store.counter, store.record):
        assert _tpm_run(tpm, "tpm2_nvundefine", f"0x{handle:08x}", "-C", "o").returncode == 0
    forged = TpmAnchor(store.volume_id, b"x" * 16, "/vol", store.counter)
    forged._define(store.counter, 8, counter=True)
    forged._define(store.record, 40, counter=False)
    forged._increment()
    assert forged._read_counter() > first.version + 2  # a new counter starts above every old one
    forged._write_record(Anchor(first.version + 1, b"\x01" * 32))
    with pytest.raises(AnchorError):
        store.read()  # our authorization no longer opens them, and the versions disagree anyway


def test_volume_rollback_with_a_tpm_anchor(tpm, tmp_path):
    key = os.urandom(16)
    path = tmp_path / "vol"
    with Volume.create(path, key, label="/d", policy=KeyPolicy.of("file:/k"), anchor="auto") as volume:
        assert volume.store.kind == "tpm"
        volume.write_file("/f", b"one")
    shutil.copytree(path, tmp_path / "old")
    with Volume.open(path, key) as volume:
        volume.write_file("/f", b"two")
    shutil.rmtree(path)
    shutil.copytree(tmp_path / "old", path)
    with pytest.raises(VolumeIntegrityError, match="volume rolled back: .* the tpm anchor holds version"):
        Volume.open(path, key)
    # the platform folder holds no version for a TPM-anchored volume: wiping it changes nothing
    shutil.rmtree(os.environ["COVE_PLATFORM_DIR"])
    with pytest.raises(VolumeIntegrityError, match="rolled back"):
        Volume.open(path, key)


def test_deleted_tpm_volume_is_remembered_and_forgotten(tpm, tmp_path):
    key = os.urandom(16)
    path = tmp_path / "vol"
    with Volume.create(path, key, label="/d", policy=KeyPolicy.of("file:/k"), anchor="tpm") as volume:
        volume.write_file("/f", b"data")
        counter = volume.store.counter
    shutil.rmtree(path)
    known = anchor.known_volume_at(str(path))
    assert known is not None and known["kind"] == "tpm"
    assert anchor.forget_records(str(path))
    assert anchor.known_volume_at(str(path)) is None
    listing = _tpm_run(tpm, "tpm2_getcap", "handles-nv-index").stdout.decode()
    assert f"0x{counter:x}" not in listing.lower()


def test_tpm_anchor_without_a_tpm_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(AnchorError, match="in a TPM, and this platform has none"):
        TpmAnchor(os.urandom(16), os.urandom(16), "/vol")
