"""The node's /dev/attestation server (cove.daemon.attestation) leaves a mount watcher (cove.util.detach_after_exit).

Killed with SIGKILL (the OOM killer, `kill -9`), the server cannot unmount,
and its dead mount (ENOTCONN to every reader) used to stay under the node's
root until the next start: the watcher must detach it by itself. Then
``ensure_server`` starts a new server that answers, and a clean stop (SIGTERM)
unmounts and sends its watcher off. As root (the daemon's case: the kernel's
mount(2) and umount2) and as an unprivileged user (fusermount3 both ways).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cove import util
from cove.daemon import attestation
from cove.platform import devattest
from tests.conftest import require
from tests.daemon.conftest import node_server_processes, parent_pid

STARTER = "import sys, pathlib; from cove.daemon import attestation; print(attestation.ensure_server(pathlib.Path(sys.argv[1])))"


@dataclass
class Node:
    """How to start the node's server as one account: a command prefix, its Python, its environment, its root."""

    prefix: list[str]
    python: str
    env: dict[str, str]
    root: Path

    @property
    def mountpoint(self) -> Path:
        return self.root / "attestation"

    def ensure_server(self) -> int:
        """``ensure_server`` as that account (as a supervisor calls it); the pid of the server that answers."""
        done = subprocess.run(
            [*self.prefix, self.python, "-c", STARTER, str(self.root)],
            env=self.env,
            capture_output=True,
            text=True,
            cwd="/",
            timeout=120,
        )
        assert done.returncode == 0, done.stderr + self.log()
        control = done.stdout.strip()
        assert control == str(self.root / "attestation.sock")
        status = attestation.request(control, {"op": "status"})
        assert status["ok"], status
        return int(status["pid"])

    def log(self) -> str:
        try:
            return (self.root / "attestation.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


# as root both paths; as a user, that user's path is all there is (the root case exists only when the suite runs as root)
@pytest.fixture(params=["root", "unprivileged"] if os.geteuid() == 0 else ["unprivileged"])
def node(request) -> Iterator[Node]:
    require("fusermount3")
    if not os.path.exists("/dev/fuse"):
        pytest.fail("no /dev/fuse: run scripts/setup (fuse3)")
    if request.param == "root":
        base = Path(tempfile.mkdtemp(prefix="cove-node-watch-"))
        env = dict(os.environ, COVE_PLATFORM_DIR=str(base / "platform"))
        prefix, python = [], sys.executable
    else:
        user = request.getfixturevalue("user_cove")
        base = Path(tempfile.mkdtemp(prefix="cove-node-watch-", dir=user.workdir))
        os.chown(base, user.uid, user.gid)
        env = dict(user.env)
        prefix, python = user.prefix, str(Path(user.command).parent / "python")
    root = base / "node"
    root.mkdir(mode=0o700)
    os.chown(root, base.stat().st_uid, base.stat().st_gid)
    found = Node(prefix, python, env, root)
    try:
        yield found
    finally:
        for pid in node_server_processes(root):  # whatever a failed test left: servers, then the mount
            os.kill(pid, signal.SIGKILL)
        devattest.unmount(str(found.mountpoint))
        shutil.rmtree(base, ignore_errors=True)
        assert util.mount_device(str(found.mountpoint)) is None, "a mount stayed"


def _watcher_of(server: int, seconds: float = 30) -> int:
    """The server's watcher: a child of it in a session of its own (made just after "ready", so wait a little)."""
    deadline = time.monotonic() + seconds
    while True:
        for pid in _servers_children(server):
            try:
                if os.getsid(pid) == pid:
                    return pid
            except ProcessLookupError:
                pass
        assert time.monotonic() < deadline, f"the node server {server} left no mount watcher"
        time.sleep(0.02)


def _servers_children(server: int) -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and parent_pid(int(e)) == server]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(what: str, done, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_killed_node_servers_mount_goes_and_the_next_start_serves(node):
    first = node.ensure_server()
    device = util.mount_device(str(node.mountpoint))
    assert device is not None, "the node server did not mount"
    watcher = _watcher_of(first)
    os.kill(first, signal.SIGKILL)
    _wait(f"the killed server {first} stayed", lambda: not _alive(first))
    _wait("the killed node server's mount stayed", lambda: util.mount_device(str(node.mountpoint)) != device)
    assert util.mount_device(str(node.mountpoint)) is None  # nothing else took its place
    _wait(f"the watcher {watcher} stayed after its detach", lambda: not _alive(watcher))

    second = node.ensure_server()  # as the next enclave's supervisor does
    assert second != first
    assert util.mount_device(str(node.mountpoint)) is not None
    watcher = _watcher_of(second)
    os.kill(second, signal.SIGTERM)  # the clean stop: its own unmount, then the watcher sent off
    _wait(f"the server {second} did not stop", lambda: not _alive(second))
    _wait(f"the watcher {watcher} stayed after a clean stop", lambda: not _alive(watcher))
    assert util.mount_device(str(node.mountpoint)) is None
    log = node.log()
    assert "Traceback" not in log and "no watcher" not in log, log


def test_a_watcher_that_cannot_be_made_is_one_line_and_no_error(tmp_path, capsys):
    """What both /dev/attestation servers call (util.watch_mount): without a watcher they serve all the same."""
    assert util.watch_mount(str(tmp_path), "the node's /dev/attestation") is None  # nothing is mounted there
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"cove: no watcher for the node's /dev/attestation at {tmp_path}: nothing is mounted at {tmp_path}"
    ]
