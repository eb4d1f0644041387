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


def test_rlimit_mode_allows_max_processes_beyond_what_the_user_already_runs() -> None:
    """RLIMIT_NPROC counts every task of the real uid: with 20 processes of the user already running
    (a launcher's and its services' threads, zombies not yet reaped), an enclave limited to 16 must
    still be able to start and fork (the old limit, 16 in all, refused its first fork)."""
    import os
    import signal
    import subprocess

    uid = 4343  # an id nothing on a test machine runs as
    if os.geteuid() != 0:
        pytest.fail("this test needs root to act as another uid (run the suite as root)", pytrace=False)
    holders = [subprocess.Popen(["sleep", "60"], preexec_fn=lambda: os.setresuid(uid, uid, uid)) for _ in range(20)]
    try:
        pid = os.fork()
        if pid == 0:  # the enclave's first process, as the launcher's child: then one fork
            code = 1
            try:
                os.setresuid(uid, uid, uid)
                limits.Limits(ResourcesSection(memory=1 << 30, max_processes=16), "rlimit").apply_in_child()
                child = os.fork()
                if child == 0:
                    os._exit(0)
                os.waitpid(child, 0)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the enclave could not fork under its own limit"
    finally:
        for holder in holders:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
