"""Real Podman and containerd (`ctr`) running Cove images through `cove-runtime`, end to end."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from tests.oci.conftest import retag_tampered
from tests.oci.helpers import IMAGE, RUN_OPTIONS, RUNTIME, podman


def test_podman_run_prints_output_and_returns_the_exit_code(loaded):
    result = podman(
        "run",
        "--rm",
        *RUN_OPTIONS,
        IMAGE,
        "/bin/sh",
        "-c",
        "echo out; echo err >&2; cat /dev/attestation/attestation_type; echo; exit 7",
    )
    assert result.returncode == 7, result.stderr
    assert result.stdout.split() == ["out", "cove"] and "err" in result.stderr


def test_podman_detached_logs_stop_kill_rm(loaded):
    script = "echo started; trap 'echo term; exit 3' TERM; while :; do sleep 0.1; done"
    names = []
    for how in ("stop", "kill"):
        name = f"cove-test-{uuid.uuid4().hex[:8]}"
        names.append(name)
        started = podman("run", "-d", "--name", name, *RUN_OPTIONS, IMAGE, "/bin/sh", "-c", script)
        assert started.returncode == 0, started.stderr
        for _ in range(200):
            if "started" in podman("logs", name).stdout:
                break
            time.sleep(0.05)
        assert podman("inspect", name, "--format", "{{.State.Status}}").stdout.strip() == "running"
        ended = podman(how, *(["-t", "10"] if how == "stop" else []), name)
        assert ended.returncode == 0, ended.stderr
        podman("wait", name)
        code = podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip()
        assert code == ("3" if how == "stop" else "137")
        assert "term" in podman("logs", name).stdout or how == "kill"
        assert podman("rm", name).returncode == 0
    listed = podman("ps", "-a", "--format", "{{.Names}}").stdout.split()
    assert not set(names) & set(listed)


def test_podman_refuses_a_tampered_image(loaded):
    result = podman("run", "--rm", *RUN_OPTIONS, "localhost/cove-test/tampered:1", "/bin/cat", "/etc/hostname")
    assert result.returncode != 0 and "tampered" not in result.stdout
    assert "bin/cat was modified" in result.stderr


def test_ctr_run_and_a_tampered_image(containerd, oci_tar, tmp_path):
    imported = containerd.ctr("images", "import", str(oci_tar))
    assert imported.returncode == 0, imported.stderr
    result = containerd.ctr(
        "run", "--rm", "--runc-binary", RUNTIME, IMAGE, "c-ok", "/bin/sh", "-c", "echo hi-from-ctr; exit 4"
    )
    assert result.returncode == 4 and result.stdout.strip() == "hi-from-ctr", result.stderr
    tampered = retag_tampered(oci_tar, tmp_path / "t.tar", "localhost/cove-test/tampered:1")
    assert containerd.ctr("images", "import", str(tampered)).returncode == 0
    result = containerd.ctr(
        "run", "--rm", "--runc-binary", RUNTIME, "localhost/cove-test/tampered:1", "c-bad", "/bin/cat", "/etc/hostname"
    )
    assert result.returncode != 0 and "tampered" not in result.stdout
    assert "bin/cat was modified" in result.stderr
    containerd.ctr("containers", "rm", "c-bad")


def test_podman_terminal_through_the_console_socket(loaded):
    result = podman("run", "--rm", "-t", *RUN_OPTIONS, IMAGE, "/bin/sh", "-c", "test -t 1 && echo on-a-tty; exit 5")
    assert result.returncode == 5, result.stderr
    assert result.stdout.strip() == "on-a-tty"  # `test -t 1` held inside: the program had a terminal


@pytest.mark.parametrize(
    "option, field",
    [
        (("--cap-add", "SYS_ADMIN"), "CAP_SYS_ADMIN"),
        (("--privileged",), "privileged"),
        (("-v", "/etc:/host-etc"), "mounts"),
    ],
)
def test_podman_options_the_sandbox_cannot_honour(loaded, option, field):
    result = podman("run", "--rm", *RUN_OPTIONS, *option, IMAGE, "/bin/echo", "ran")
    assert result.returncode != 0 and "ran" not in result.stdout
    assert field in result.stderr


def test_podman_exec_with_and_without_a_terminal(loaded):
    name = f"cove-test-{uuid.uuid4().hex[:8]}"
    started = podman("run", "-d", "--name", name, *RUN_OPTIONS, IMAGE, "/bin/sleep", "60")
    assert started.returncode == 0, started.stderr
    try:
        result = podman("exec", name, "/bin/sh", "-c", "cat /dev/attestation/attestation_type; echo; exit 6")
        assert result.returncode == 6 and result.stdout.split() == ["cove"], result.stderr
        result = podman("exec", "-t", name, "/bin/sh", "-c", "test -t 1 && echo on-a-tty; exit 5")
        assert result.returncode == 5 and result.stdout.strip() == "on-a-tty", result.stderr
        for option, word in ((("--user", "1000"), "measured user"), (("--privileged",), "CAP_SYS_ADMIN")):
            refused = podman("exec", *option, name, "/bin/echo", "ran")
            assert refused.returncode != 0 and "ran" not in refused.stdout and word in refused.stderr
    finally:
        podman("rm", "-f", "-t", "0", name)


def test_ctr_task_exec(containerd, oci_tar):
    assert containerd.ctr("images", "import", str(oci_tar)).returncode == 0
    started = containerd.ctr("run", "-d", "--runc-binary", RUNTIME, IMAGE, "c-exec", "/bin/sleep", "60")
    assert started.returncode == 0, started.stderr
    try:
        result = containerd.ctr(
            "task",
            "exec",
            "--exec-id",
            "e1",
            "c-exec",
            "/bin/sh",
            "-c",
            "cat /dev/attestation/attestation_type; echo; exit 5",
        )
        assert result.returncode == 5 and result.stdout.split() == ["cove"], result.stderr
    finally:
        containerd.ctr("task", "kill", "-s", "KILL", "c-exec")
        for _ in range(100):
            if containerd.ctr("task", "rm", "c-exec").returncode == 0:
                break
            time.sleep(0.1)
        containerd.ctr("containers", "rm", "c-exec")


def test_podman_memory_limit_holds_the_program_not_coves_start(loaded):
    """`--memory` is the container's cgroup, made as runc makes it; the runtime joins it only after `start`, so a
    limit far below what Cove's start-up uses still starts, the enclave's own groups are below it, and a program
    that needs more than the limit is killed."""
    small = podman("run", "--rm", "--memory", "64m", *RUN_OPTIONS, IMAGE, "/bin/echo", "started-within-64m")
    assert small.returncode == 0 and small.stdout.strip() == "started-within-64m", small.stderr
    name = f"cove-test-{uuid.uuid4().hex[:8]}"
    started = podman("run", "-d", "--name", name, "--memory", "128m", *RUN_OPTIONS, IMAGE, "/bin/sleep", "60")
    assert started.returncode == 0, started.stderr
    try:
        pid = int(podman("inspect", name, "--format", "{{.State.Pid}}").stdout)
        ident = podman("inspect", name, "--format", "{{.Id}}").stdout.strip()
        # it joins when it reads `start`'s byte: `run -d` may return while it still loads the launcher
        for _ in range(200):
            group = [line.split(":", 2)[2].strip() for line in open(f"/proc/{pid}/cgroup") if ":memory:" in line][0]
            if ident in group:
                break
            time.sleep(0.05)
        assert ident in group
        assert int(open(f"/sys/fs/cgroup/memory{group}/memory.limit_in_bytes").read()) == 128 << 20
        for _ in range(200):
            below = [p for p in Path(f"/sys/fs/cgroup/memory{group}").glob("cove-*")]
            if below and (below[0] / "cgroup.procs").read_text().split():
                break
            time.sleep(0.05)
        assert below and (below[0] / "cgroup.procs").read_text().split()  # the enclave, inside the engine's group
    finally:
        podman("rm", "-f", "-t", "0", name)
    assert not Path(f"/sys/fs/cgroup/memory{group}").exists()  # removed with the container
    hungry = podman(
        "run",
        "--rm",
        "--memory",
        "64m",
        *RUN_OPTIONS,
        IMAGE,
        "/bin/sh",
        "-c",
        "a=$(/usr/bin/head -c 200000000 /dev/urandom); echo survived",
    )
    assert hungry.returncode != 0 and "survived" not in hungry.stdout
