"""A killed launcher leaves nothing behind for long: the next run removes it."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from tests.e2e.helpers import make_instance


def test_private_root_of_a_killed_launcher_is_removed(cove, probe, tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    env = {"COVE_RUNTIME_DIR": str(runtime)}
    root = make_instance(cove, tmp_path, probe)
    proc = subprocess.Popen(
        [*cove.popen_args("run", "/bin/probe", "wait")],
        cwd=root,
        env=dict(cove.env, **env),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "ready\n"
    leftovers = [p for p in runtime.iterdir() if p.name.startswith("cove-enclave-")]
    assert len(leftovers) == 1 and (leftovers[0] / "root" / "bin" / "probe").exists()
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up
    proc.wait()
    time.sleep(0.2)
    assert leftovers[0].exists()
    cove.ok("run", "/bin/probe", "exit", "0", cwd=root, env=env)
    assert not leftovers[0].exists()
    assert list(runtime.iterdir()) == []
