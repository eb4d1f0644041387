"""What the registry syncs to disk, and what a crash of the machine can leave that the next daemon removes.

A kill -9 of the daemon loses nothing that was written (the page cache outlives processes), so an
attached `cove run`'s record, removed at its end anyway, is not fsynced; a detached enclave's is. A
record written but not synced when the machine went down reads empty: recover() removes its folder
and its name, unless a live supervisor still holds it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from cove.daemon.registry import Registry

RECORD = {k: None for k in ("image", "measurement", "signer", "backend", "program", "instance", "restart")}


@pytest.mark.parametrize("attached, synced", [(True, False), (False, True)])
def test_only_a_detached_record_is_fsynced(tmp_path, monkeypatch, attached, synced):
    registry = Registry(tmp_path)
    syncs: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (syncs.append(fd), real(fd))[1])
    enclave = registry.create(dict(RECORD, args=[], uid=0, attached=attached))
    assert bool(syncs) is synced
    assert enclave.record["attached"] is attached  # written whole either way


def test_recover_removes_a_record_lost_in_a_crash(tmp_path):
    registry = Registry(tmp_path)
    lost = registry.create(dict(RECORD, args=[], uid=0, attached=True, name="lost"))
    held = registry.create(dict(RECORD, args=[], uid=0, attached=True, name="held"))
    kept = registry.create(dict(RECORD, args=[], uid=0, attached=False, name="kept"))
    live = subprocess.Popen(["sleep", "30"])
    try:
        for enclave in (lost, held, kept):  # each with a supervisor's state: not a half-made registration
            pid = live.pid if enclave is held else 1 << 22
            (enclave.folder / "state.json").write_text(json.dumps({"pid": pid, "state": "running"}))
        for enclave in (lost, held):
            (enclave.folder / "record.json").write_bytes(b"")  # the name and folder were synced, not the data
        removed = registry.recover()
        assert removed == [lost.id]
        assert not lost.folder.exists() and not (tmp_path / "names" / "lost").is_symlink()
        assert held.folder.exists()  # a live supervisor's: never removed
        assert [e.name for e in registry.all()] == ["kept"] and registry.find("kept").status == "exited"
    finally:
        live.kill()
        live.wait()
    assert sorted(os.listdir(tmp_path / "incoming")) == []
    assert Path(tmp_path / "names" / "held").is_symlink()
