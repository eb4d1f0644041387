"""A prepared sim sandbox whose child died (killed, out of memory) is not taken for a started one.

cove.runtime.sim.Prepared forks the sandbox's first process ahead. The launch took it without looking
whether it still lived, and an error pipe that ended empty counted as an exec: the enclave "ended" with
the dead child's status and the program never ran. Now a dead one is not taken (the launch spawns a
fresh child), and a start confirms the exec (a death between the look and the start also falls back).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cove.config import ResourcesSection
from cove.runtime import limits, sim
from tests.conftest import require

# `cove run` as its entry point runs it, the prepared child killed at WHEN (argv[1]) and reaped by nobody
DRIVER = """
import os, signal, sys, time
from cove.runtime import sim

def kill(child):
    os.kill(child.pid, signal.SIGKILL)
    while open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.005)

when, prepare, start = sys.argv[1], sim.prepare, sim.Prepared.start
def prepare_(resources):
    child = prepare(resources)
    if when == "before the launch" and child is not None:
        kill(child)
    return child
def start_(self, argv, env):
    if when == "at its start":
        kill(self)
    return start(self, argv, env)
sim.prepare, sim.Prepared.start = prepare_, start_
from cove.cli import main
sys.exit(main(sys.argv[2:]))
"""


def zombie(pid: int) -> None:
    """Wait until PID has died (not reaped: its parent has not looked)."""
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_a_start_of_a_dead_child_is_no_start():
    child = sim.prepare(ResourcesSection())
    assert child is not None, "no cgroup on this host: the start is not prepared here"
    try:
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        zombie(child.pid)
        assert child.start(["/bin/true"], {}) is None  # the pipe ended with its death, not an exec
        assert child.returncode == -signal.SIGKILL
    finally:
        sim.discard_prepared()
    assert not any(group.exists() for group in child.limits.groups)


@pytest.mark.parametrize("when", ["before the launch", "at its start"])
def test_a_run_whose_prepared_child_died_runs_its_program(cove, app, when):
    """Direct `cove run`: the program runs in a fresh child, with the verified limits; nothing is left."""
    require("bwrap")
    env = dict(cove.env, COVE_NO_DAEMON="1", COVE_DAEMON_SOCKET="/nonexistent/cove.sock")
    launcher = subprocess.Popen(
        [sys.executable, "-c", DRIVER, when, "run", "/bin/hello", "0", "3"],
        cwd=app,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = launcher.communicate(timeout=120)
    assert (launcher.returncode, out) == (3, "hello 3\n"), err
    left = [n for p in limits.parents() for n in os.listdir(p) if n.startswith(f"cove-{launcher.pid}-")]
    assert left == []
