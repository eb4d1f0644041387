"""What the OCI tests share: a base config.json, cove-runtime and podman as engines call them."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.conftest import require

RUNTIME = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "cove-runtime")

SPEC = {
    "ociVersion": "1.0.2",
    "process": {
        "args": ["/bin/sh", "-c", "echo hello-from-enclave; cat /dev/attestation/attestation_type; echo; exit 7"],
        "env": ["PATH=/bin:/usr/bin"],
        "cwd": "/",
        "user": {"uid": 0, "gid": 0},
        "capabilities": {"bounding": ["CAP_CHOWN", "CAP_KILL"]},
        "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 1024}],
    },
    "root": {"path": "rootfs"},
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts", "options": ["bind"]},
    ],
    "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "network"}]},
}


def runtime(
    root: Path | str, *args: str, timeout: float = 60, stdout: Any = None, stderr: Any = None
) -> subprocess.CompletedProcess[str]:
    """Run cove-runtime; output through files, as a container's process keeps the streams it inherits."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run(
            [RUNTIME, "--root", str(root), *args],
            stdout=stdout or out,
            stderr=stderr or err,
            text=True,
            timeout=timeout,
        )
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("cove-runtime: error: ")
    return lines[0]


def write_spec(folder: Path, spec: dict[str, Any]) -> None:
    (folder / "config.json").write_text(json.dumps(spec))


def state(root: Path, ident: str) -> dict[str, Any]:
    result = runtime(root, "state", ident)
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def wait_stopped(root: Path, ident: str, pid: int) -> None:
    for _ in range(600):
        if state(root, ident)["status"] == "stopped":
            return
        time.sleep(0.05)
    raise AssertionError("the container did not stop")


def no_leftovers(root: Path, ident: str) -> None:
    assert not (root / ident).exists()
    assert not any(str(root) in line for line in open("/proc/self/mounts"))


# This machine kind: cgroups v1 hybrid (cgroupfs manager) and hard rlimits below Podman's defaults.
PODMAN_OPTIONS = ("--cgroup-manager=cgroupfs",)
RUN_OPTIONS = ("--runtime", RUNTIME, "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
IMAGE = "localhost/cove-test/hello:1"


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require("podman"), *PODMAN_OPTIONS, *args], capture_output=True, text=True, timeout=timeout)
