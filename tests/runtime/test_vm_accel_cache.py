"""The vm backend's accel.json probe cache, tampered: never a crash, never a foreign answer believed."""

from __future__ import annotations

import json
import os

import pytest

from cove.runtime.vm import VmBackend, qemu
from tests.conftest import require


@pytest.mark.parametrize(
    "data",
    [b"[" * 100_000, b'{"a:b": "kvm"} x', b'[["a:b", "kvm"]]', "wrong-field-type"],
    ids=["deep-nesting", "trailing-garbage", "wrong-top-level-type", "wrong-field-type"],
)
def test_a_hostile_probe_cache_means_probe_again(tmp_path, monkeypatch, data):
    require("qemu-system-x86_64")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.fail("the test needs a usable /dev/kvm (root on the CI machine)")
    st = os.stat(qemu())
    if data == "wrong-field-type":  # an answer for this QEMU that is neither kvm nor tcg
        data = json.dumps({f"{'00' * 32}:{st.st_size}:{st.st_mtime_ns}": 5}).encode()
    (tmp_path / "cove" / "vm").mkdir(parents=True)
    (tmp_path / "cove" / "vm" / "accel.json").write_bytes(data)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("COVE_VM_ACCEL", raising=False)
    availability = VmBackend.availability()
    assert "probed at the first run" in availability.reason, availability
