"""Enclave resource limits: a cgroup that cannot be used means rlimits, never a crash."""

from __future__ import annotations

import pytest

from cove.config import ResourcesSection
from cove.runtime import limits


@pytest.mark.parametrize("mode", ["cgroup1", "cgroup2"])
def test_a_cgroup_gone_after_detection_falls_back_to_rlimits(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    # The hierarchy was there when detect_mode looked and is gone when create() needs it (the
    # process moved, /proc unreadable). Found by mypy: create() divided None by a name (TypeError).
    monkeypatch.setattr(limits, "detect_mode", lambda: mode)
    monkeypatch.setattr(limits, "_own_cgroup_v1", lambda controller: None)
    monkeypatch.setattr(limits, "_own_cgroup_v2", lambda: None)
    made = limits.Limits.create(ResourcesSection())
    assert made.mode == "rlimit"
    assert made.groups == ()
