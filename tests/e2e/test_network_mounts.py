"""Network modes and mounts behave as cove.toml says."""

from __future__ import annotations

import os
import socket

import pytest

from cove import hostids
from tests.e2e.helpers import make_instance


@pytest.fixture
def server():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    yield listener.getsockname()[1]
    listener.close()


@pytest.mark.parametrize(
    "mode, reaches_host, socket_allowed", [("none", False, False), ("loopback", False, True), ("host", True, True)]
)
def test_network_modes(cove, probe, tmp_path, server, mode, reaches_host, socket_allowed):
    root = make_instance(cove, tmp_path, probe, options={("network", "mode"): f'"{mode}"'})
    result = cove("run", "/bin/probe", "connect", str(server), cwd=root)
    assert (result.returncode == 0) == reaches_host, result.stdout
    assert ("socket: denied" in result.stdout) == (not socket_allowed), result.stdout


def test_host_mounts_are_read_only_unless_writable(cove, probe, tmp_path):
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    os.chown(rw, *hostids.enclave_range().host(0, 0))  # the enclave's host user (never host root)
    (ro / "data.txt").write_text("from the host\n")
    root = make_instance(
        cove,
        tmp_path,
        probe,
        extra=(
            f'\n[[mounts]]\ntarget = "/ro"\ntype = "host"\nsource = "{ro}"\n'
            f'\n[[mounts]]\ntarget = "/rw"\ntype = "host"\nsource = "{rw}"\nwritable = true\n'
        ),
    )
    assert cove.ok("run", "/bin/cat", "/ro/data.txt", cwd=root).stdout == "from the host\n"
    denied = cove("run", "/bin/sh", "-c", "echo x > /ro/new", cwd=root)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    assert not (ro / "new").exists()
    cove.ok("run", "/bin/sh", "-c", "echo written > /rw/new", cwd=root)
    assert (rw / "new").read_text() == "written\n"


def test_the_image_is_read_only_and_tmpfs_is_private(cove, probe, tmp_path):
    root = make_instance(cove, tmp_path, probe)
    result = cove("run", "/bin/sh", "-c", "echo x > /etc/new", cwd=root)
    assert result.returncode != 0 and "Read-only file system" in result.stderr
    cove.ok("run", "/bin/sh", "-c", "echo x > /tmp/scratch", cwd=root)
    # each run gets a fresh /tmp
    assert cove("run", "/bin/cat", "/tmp/scratch", cwd=root).returncode != 0
    assert not (root / "image" / "tmp" / "scratch").exists()


def test_tmpfs_size_is_enforced(cove, probe, tmp_path):
    root = make_instance(cove, tmp_path, probe)
    text = (root / "cove.toml").read_text().replace('options = { size = "64M" }', 'options = { size = "1M" }')
    (root / "cove.toml").write_text(text)
    cove.ok("build", cwd=root)
    result = cove("run", "/bin/sh", "-c", "head -c 3000000 /dev/zero > /tmp/fill", cwd=root)
    assert result.returncode != 0 and "No space left on device" in result.stderr
    assert cove.ok("run", "/bin/sh", "-c", "head -c 500000 /dev/zero > /tmp/fill", cwd=root)


def test_tmpfs_defaults_to_sticky_world_writable(cove, probe, tmp_path):
    root = make_instance(cove, tmp_path, probe)
    assert cove.ok("run", "/bin/ls", "-ld", "/tmp", cwd=root).stdout.startswith("drwxrwxrwt")
