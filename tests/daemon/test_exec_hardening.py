"""`cove exec` against the review's attacks: a reused pid, programs that leave their group, endless output."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from cove.daemon.registry import process_start
from cove.daemon.server import children, sandbox_init


@pytest.fixture(scope="module")
def sleeper(node, app):
    """A running hello enclave (sleeping); its id and its program's host pid."""
    ident = node.cove.ok("run", "-d", "/bin/hello", "600", cwd=app).stdout.strip()
    view = node.until(ident, "running")
    deadline = time.monotonic() + 20
    while not (program := children(sandbox_init(view["supervisor_pid"]) or 0)):
        assert time.monotonic() < deadline, "the enclave's program never started"
        time.sleep(0.05)
    yield ident, program[0]
    node.cove("rm", "-f", ident)


def _helper(pid: int, spec: dict) -> subprocess.CompletedProcess:
    """Run the exec helper as the daemon does: the spec over a socket pair, never on the command line."""
    parent, child = socket.socketpair()
    with parent, child:
        process = subprocess.Popen([sys.executable, "-m", "cove.daemon.execin", str(pid), str(child.fileno())],
                                   pass_fds=(child.fileno(),), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        child.close()
        parent.sendall(json.dumps(spec).encode())
        parent.shutdown(socket.SHUT_WR)
        out, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_a_reused_pid_is_refused(sleeper):
    """The helper checks the program's start time through one /proc/PID descriptor: another start, no entry."""
    _, pid = sleeper
    spec = {"argv": ["/bin/hello"], "uid": 65534, "gid": 65534, "cwd": "/", "env": {}, "secret_env": [],
            "max_open_files": 64, "seccomp": "", "start": process_start(pid) + 1}  # (as if pid were reused)
    done = _helper(pid, spec)
    assert done.returncode == 125, done
    assert done.stderr.strip() == ("cove: error: cannot enter the enclave: its program is gone "
                                   f"(process {pid} is no longer the enclave's program)")
    assert "hello" not in done.stdout
