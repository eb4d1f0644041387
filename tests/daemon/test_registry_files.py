"""The daemon's record.json and state.json, tampered on disk: the enclave is skipped, `cove ps` never crashes."""

from __future__ import annotations

import json

import pytest

from cove.daemon.registry import Registry
from cove.errors import NotFoundError

HOSTILE = {
    "deep-nesting": b"[" * 100_000,
    "trailing-garbage": b'{"id": "x", "name": "x"} {}',
    "wrong-top-level-type": b'[{"id": "x", "name": "x"}]',
    "wrong-field-type": json.dumps({"id": 5, "name": ["x"]}).encode(),
}


@pytest.mark.parametrize("data", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_record_or_state_is_not_read(tmp_path, data):
    registry = Registry(tmp_path)
    good = registry.create({"name": "good", "image": "i"})
    bad = registry.create({"name": "bad", "image": "i"})
    (bad.folder / "record.json").write_bytes(data)
    (good.folder / "state.json").write_bytes(data)
    assert [e.name for e in registry.all()] == ["good"]
    assert registry.load(good.id).status == "created"  # a foreign state.json reads as none
    with pytest.raises(NotFoundError):
        registry.find(bad.id[:12])
    with pytest.raises(ValueError):
        registry.load(bad.id)
