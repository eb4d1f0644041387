"""Real Podman and containerd through the resident `create` (cove.oci.resident): what they see is unchanged.

The helper here is the machine's (the default socket, started with
`cove-runtime resident` as an operator would): engines do not hand their
environment through conmon, and an on-demand helper never starts under an
engine (a subreaper).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest

from tests.oci.conftest import retag_tampered
from tests.oci.helpers import IMAGE, RUN_OPTIONS, RUNTIME, podman


@pytest.fixture
def machine_helper(monkeypatch, bundle, tmp_path):
    """The machine's helper, answering with the code as it is now (one that finds its code changed declines
    once and starts again: a direct create is retried until it goes through the helper)."""
    import marshal

    monkeypatch.delenv("COVE_RUNTIME_RESIDENT", raising=False)
    started = subprocess.run(
        [RUNTIME, "resident"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, COVE_RUNTIME_RESIDENT_IDLE="600"),  # not for ever on a developer's machine
    )
    assert started.returncode == 0, started.stderr
    root = tmp_path / "probe"
    for _ in range(100):
        made = subprocess.run(
            [RUNTIME, "--root", str(root), "create", "--bundle", str(bundle), "probe"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        assert made.returncode == 0
        through = "enclave_pid" in marshal.loads((root / "probe" / "state.marshal").read_bytes())
        subprocess.run([RUNTIME, "--root", str(root), "delete", "--force", "probe"], check=True, timeout=60)
        if through:
            return
        time.sleep(0.1)
    raise AssertionError(
        "the machine's resident helper does not serve this checkout (one of another checkout declines every create:"
        " stop it, e.g. `pkill -f 'cove.oci.resident serve'`, and run again)"
    )


def _is_stub(pid: int) -> bool:
    """The engine's container pid is the stub: `create`'s fork, with no child (the enclave is the helper's)."""
    cmdline = open(f"/proc/{pid}/cmdline").read().split("\0")
    children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    return "create" in cmdline and children == []


def _conmons(name: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline").read()
        except OSError:
            continue
        if cmdline.startswith("/usr/bin/conmon") and f"\0{name}\0" in cmdline:
            found.append(pid)
    return found


def test_podman_through_the_helper(machine_helper, loaded):
    name = f"cove-res-{uuid.uuid4().hex[:8]}"
    script = "echo started; trap 'echo term; exit 3' TERM; while :; do sleep 0.1; done"
    started = podman("run", "-d", "--name", name, *RUN_OPTIONS, IMAGE, "/bin/sh", "-c", script)
    assert started.returncode == 0, started.stderr
    for _ in range(200):
        if "started" in podman("logs", name).stdout:
            break
        time.sleep(0.05)
    pid = int(podman("inspect", name, "--format", "{{.State.Pid}}").stdout)
    assert _is_stub(pid)
    assert podman("stop", "-t", "10", name).returncode == 0  # SIGTERM, relayed by the stub to the program
    podman("wait", name)
    assert podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip() == "3"
    assert "term" in podman("logs", name).stdout
    assert podman("rm", name).returncode == 0
    for _ in range(100):  # conmon waits for all its descendants before it leaves: none of the helper's is one
        if not _conmons(name):
            break
        time.sleep(0.05)
    assert _conmons(name) == []
    result = podman("run", "--rm", *RUN_OPTIONS, IMAGE, "/bin/sh", "-c", "echo out; echo err >&2; exit 7")
    assert result.returncode == 7 and result.stdout.split() == ["out"] and "err" in result.stderr
    refused = podman("run", "--rm", *RUN_OPTIONS, "localhost/cove-test/tampered:1", "/bin/cat", "/etc/hostname")
    assert refused.returncode != 0 and "tampered" not in refused.stdout
    assert "bin/cat was modified" in refused.stderr


def test_ctr_through_the_helper(machine_helper, containerd, oci_tar, tmp_path):
    assert containerd.ctr("images", "import", str(oci_tar)).returncode == 0
    result = containerd.ctr("run", "--rm", "--runc-binary", RUNTIME, IMAGE, "r-ok", "/bin/sh", "-c", "echo hi; exit 4")
    assert result.returncode == 4 and result.stdout.strip() == "hi", result.stderr
    tampered = retag_tampered(oci_tar, tmp_path / "t.tar", "localhost/cove-test/tampered:1")
    assert containerd.ctr("images", "import", str(tampered)).returncode == 0
    result = containerd.ctr(
        "run", "--rm", "--runc-binary", RUNTIME, "localhost/cove-test/tampered:1", "r-bad", "/bin/cat", "/etc/hostname"
    )
    assert result.returncode != 0 and "tampered" not in result.stdout
    assert "bin/cat was modified" in result.stderr
    containerd.ctr("containers", "rm", "r-bad")
