"""Files in the enclave's tmpfs mounts count against resources.memory, for root and for a user.

A user without a delegated memory cgroup is limited by rlimits only, which nothing in a tmpfs is
charged to: every tmpfs the sandbox makes (/dev/shm, tmpfs mounts with or without a size) is sized
at most resources.memory, and /dev itself is read-only. As root the cgroup charges the pages too,
so a fill may end in an out-of-memory kill instead of a full file system; either way it stays under.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import error_line
from tests.e2e.helpers import make_instance

MEMORY_MB = 48
SLACK_MB = 4
TRIED_MB = 3 * MEMORY_MB


@pytest.fixture(scope="module")
def small(whoever):
    """An enclave with 48M of memory, the template's /tmp (64M: above the limit) and an unsized tmpfs."""
    cove, parent, probe = whoever
    extra = '\n[[mounts]]\ntarget = "/scratch"\ntype = "tmpfs"\n'
    return cove, make_instance(
        cove, parent, probe, name="small", options={("resources", "memory"): f'"{MEMORY_MB}M"'}, extra=extra
    )


@pytest.mark.parametrize("path", ["/dev/shm/fill", "/tmp/fill", "/scratch/fill"])
def test_tmpfs_writes_stay_under_the_memory_limit(small, path):
    cove, app = small
    result = cove("run", "/bin/probe", "fill", path, str(TRIED_MB), cwd=app)
    assert result.returncode != 0, result.stdout
    wrote = re.search(r"fill: wrote (\d+) MB", result.stdout)
    if wrote is None:  # killed before it could say: only the cgroup (root) does that
        assert error_line(result).startswith("cove: error: killed: out of memory"), result.stderr
    else:
        assert int(wrote.group(1)) <= MEMORY_MB + SLACK_MB, result.stdout


def test_dev_itself_is_read_only(small):
    cove, app = small
    result = cove("run", "/bin/probe", "fill", "/dev/fill", "1", cwd=app)
    assert result.returncode == 1
    assert "fill: open: Read-only file system" in result.stdout, result.stdout


def _descendants(pid: int) -> list[int]:
    """Every live descendant of a process, parents before children."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop(0)
        try:
            children = [int(c) for c in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
        except OSError:
            children = []
        found += children
        queue += children
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_an_out_of_memory_kill_of_the_sandbox_after_the_start_says_so(cove, probe, tmp_path):
    """The kernel may kill bwrap rather than the program (tmpfs pages belong to no process): the run
    then says the enclave hit its limit, no longer that it was 'out of memory before the program started'.

    The cgroup counts OOM kills; under rlimits there are none. Here the outer bwrap is made the
    kernel's first choice (oom_score_adj 1000) once the program waits on its stdin, then it fills /dev/shm.
    """
    if os.geteuid() != 0:
        pytest.fail("this test needs root (a memory cgroup, and writing bwrap's oom_score_adj)", pytrace=False)
    app = make_instance(cove, tmp_path, probe, name="oom", options={("resources", "memory"): f'"{MEMORY_MB}M"'})
    script = f"read line; exec /bin/probe fill /dev/shm/fill {TRIED_MB}"
    run = cove.popen("run", "/bin/sh", "-c", script, cwd=app, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not any(_comm(pid) == "sh" for pid in _descendants(run.pid)):  # the program runs
            assert time.monotonic() < deadline and run.poll() is None, "the enclave did not start"
            time.sleep(0.05)
        outer = next(pid for pid in _descendants(run.pid) if _comm(pid) == "bwrap")
        Path(f"/proc/{outer}/oom_score_adj").write_text("1000")
        _, stderr = run.communicate("go\n", timeout=60)
    finally:
        run.kill()
        run.wait()
    assert run.returncode == 137, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"cove: error: killed: out of memory (resources.memory = {MEMORY_MB}M): the enclave"), line
    assert "before the program started" not in line
