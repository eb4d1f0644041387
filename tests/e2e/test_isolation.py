"""What a program inside a sim enclave can and cannot do, checked from inside.

Every test runs twice: with cove started by root, and by an unprivileged user.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cove import hostids
from tests.e2e.helpers import make_instance

# Host sysctls a root-started enclave could once write (issue 9), and a harmless value for each.
SYSCTLS = {"vm/swappiness": "61", "kernel/core_pattern": "|/bin/false", "fs/suid_dumpable": "1"}


@pytest.fixture(scope="module")
def who(whoever):
    """The `cove` command of root or of the unprivileged user."""
    return whoever[0]


@pytest.fixture(scope="module")
def app(whoever):
    cove, parent, probe = whoever
    return make_instance(
        cove,
        parent,
        probe,
        options={
            ("resources", "memory"): '"64M"',
            ("resources", "max_processes"): "16",
            ("env", "passthrough"): '["COVE_TEST_PASSED"]',
        },
    )


@pytest.fixture(scope="module")
def loopback(whoever):
    """network = "loopback" and [security] io_uring = true."""
    cove, parent, probe = whoever
    return make_instance(
        cove,
        parent,
        probe,
        name="loop",
        options={("network", "mode"): '"loopback"'},
        extra="\n[security]\nio_uring = true\n",
    )


def test_host_files_outside_the_image_are_invisible(who, app, tmp_path):
    secret = tmp_path / "host-secret"
    secret.write_text("x")
    result = who("run", "/bin/ls", "/", cwd=app)
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == {"bin", "dev", "etc", "lib", "lib64", "proc", "root", "tmp", "usr"}
    assert who("run", "/bin/cat", str(secret), cwd=app).returncode != 0
    assert who("run", "/bin/ls", "/work", cwd=app).returncode != 0


def test_proc_shows_only_the_enclaves_processes(who, app):
    result = who.ok("run", "/bin/sh", "-c", "ls /proc | grep -v '[^0-9]' || true; ls -d /proc/[0-9]*", cwd=app)
    pids = sorted({int(p.rsplit("/", 1)[-1]) for p in result.stdout.split() if p.rsplit("/", 1)[-1].isdigit()})
    assert pids and max(pids) < 10, pids  # pid 1 (sandbox init), the shell and its children only
    assert str(os.getpid()) not in result.stdout.split()


def test_no_network_in_mode_none(who, app, probe):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    server.settimeout(5)
    thread = threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True)
    thread.start()
    try:
        result = who("run", "/bin/probe", "connect", str(port), cwd=app)
        assert result.returncode == 1
        assert "socket: denied" in result.stdout
        assert not accepted
        # the same probe run natively does connect: the check above can fail
        native = subprocess.run([str(probe), "connect", str(port)], capture_output=True, text=True)
        assert native.returncode == 0, native.stdout
    finally:
        server.close()


def test_ptrace_and_namespace_escapes_are_denied(who, app):
    for check in ("ptrace", "unshare", "mount", "keyctl", "bpf", "clone-newns"):
        result = who("run", "/bin/probe", check, cwd=app)
        assert result.returncode == 1, (check, result.stdout, result.stderr)
        assert f"{check}: denied" in result.stdout


def test_capability_sets_are_empty_and_no_new_privileges(who, app):
    status = who.ok("run", "/bin/cat", "/proc/self/status", cwd=app).stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[name], 16) == 0, (name, fields[name])
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"


def test_host_environment_is_absent(who, app):
    result = who("run", "/bin/probe", "env", cwd=app, env={"COVE_TEST_LEAK": "leak", "COVE_TEST_PASSED": "passed"})
    assert result.returncode == 0
    names = {line.split("=", 1)[0] for line in result.stdout.splitlines()}
    assert "COVE_TEST_LEAK" not in names
    assert "COVE_TEST_PASSED=passed" in result.stdout.splitlines()
    # PWD is set by the sandbox to the configured cwd, not taken from the host
    assert names == {"PATH", "HOME", "LANG", "COVE_TEST_PASSED", "PWD"}
    assert "PWD=/" in result.stdout.splitlines()


def test_memory_limit_holds(who, app):
    small = who("run", "/bin/probe", "alloc", "16", cwd=app)
    assert small.returncode == 0 and "16 MB ok" in small.stdout
    big = who("run", "/bin/probe", "alloc", "256", cwd=app)
    assert big.returncode != 0
    assert "256 MB ok" not in big.stdout


def test_process_limit_holds(who, app):
    result = who.ok("run", "/bin/probe", "fork", "40", cwd=app)
    made = int(result.stdout.split()[1])
    assert 0 < made < 16, result.stdout


def _host_status(argv: bytes, timeout: float = 20) -> dict[str, str]:
    """/proc/PID/status, read on the host, of the one process whose command line is argv."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and (entry / "cmdline").read_bytes() == argv:
                    lines = (entry / "status").read_text().splitlines()
                    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)
            except OSError:
                continue
        time.sleep(0.05)
    raise AssertionError(f"no process {argv!r}")


def test_the_program_never_runs_as_host_root(who, app):
    process = who.popen("run", "/bin/probe", "wait", cwd=app, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        status = _host_status(b"/bin/probe\0wait\0")
        uids, gids = status["Uid"].split(), status["Gid"].split()
        uid = getattr(who, "uid", os.getuid())  # who runs cove
        expected = hostids.root_range().uid if uid == 0 else uid
        assert set(map(int, uids)) == {expected}, uids
        assert "0" not in gids and status["Groups"].split() in ([], [str(expected)]), status
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("name", sorted(SYSCTLS))
def test_host_sysctls_cannot_be_written(who, app, name):
    path = Path("/proc/sys") / name
    before = path.read_text()
    result = who("run", "/bin/probe", "write", f"/proc/sys/{name}", SYSCTLS[name], cwd=app)
    assert result.returncode == 1 and "write: denied" in result.stdout, (result.stdout, result.stderr)
    assert path.read_text() == before


def test_runc_read_only_and_masked_proc_paths(who, app):
    for path in (
        "/proc/sysrq-trigger",
        "/proc/irq/default_smp_affinity",
        "/proc/sys/kernel/hostname",
        "/proc/bus",
        "/proc/fs",
    ):
        if os.path.exists(path):
            result = who("run", "/bin/probe", "write", path, cwd=app)
            assert "write: denied" in result.stdout, (path, result.stdout)
    checked = 0
    for path in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug"):
        if os.path.isfile(path):
            checked += 1
            result = who("run", "/bin/probe", "read", path, cwd=app)
            assert "read: denied" in result.stdout or "read: 0 bytes" in result.stdout, (path, result.stdout)
    assert checked, "no masked /proc file exists on this kernel"
    assert who.ok("run", "/bin/ls", "-A", "/proc/acpi", cwd=app).stdout == ""
    assert "/proc/sys " in who.ok("run", "/bin/cat", "/proc/self/mountinfo", cwd=app).stdout


def test_proc_1_cmdline_names_no_host_path(who, app):
    cmdline = who.ok("run", "/bin/cat", "/proc/1/cmdline", cwd=app).stdout
    assert "bwrap" in cmdline  # the sandbox's init, as the check below expects
    assert "cove-enclave" not in cmdline and str(app) not in cmdline and "--bind" not in cmdline, cmdline


@pytest.mark.parametrize(
    "check",
    [
        ("socket", "inet"),
        ("socket", "inet6"),
        ("socket", "packet"),
        ("socket", "netlink"),
        ("socket", "vsock"),
        ("socket-high-bits",),
        ("socketpair", "inet"),
        ("io_uring",),
    ],
)
def test_offline_enclaves_cannot_create_network_sockets_or_io_uring(who, app, probe, check):
    result = who("run", "/bin/probe", *check, cwd=app)
    assert result.returncode == 1 and f"{check[0]}: denied" in result.stdout, (result.stdout, result.stderr)
    if check[0] != "socketpair":  # the same probe, run natively, gets what it asks for
        native = subprocess.run([str(probe), *check], capture_output=True, text=True)
        assert native.returncode == 0 and "allowed" in native.stdout, native.stdout


def test_unix_sockets_still_work_offline(who, app):
    for check in (("socket", "unix"), ("socketpair", "unix")):
        assert "allowed" in who.ok("run", "/bin/probe", *check, cwd=app).stdout


def test_loopback_allows_ip_not_vsock_and_io_uring_can_be_allowed(who, loopback):
    assert "socket: allowed" in who.ok("run", "/bin/probe", "socket", "inet", cwd=loopback).stdout
    assert "socket: denied" in who("run", "/bin/probe", "socket", "vsock", cwd=loopback).stdout
    assert "io_uring: allowed" in who.ok("run", "/bin/probe", "io_uring", cwd=loopback).stdout
