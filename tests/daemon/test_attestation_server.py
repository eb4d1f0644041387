"""The node's /dev/attestation server (cove.daemon.attestation) on its own, without a daemon.

Several starters at once get one server whose socket stays reachable; a
registration belongs to the process that connected, whatever pid it names;
a host process other than root is refused a folder whatever the folders'
modes; and one enclave holding many files open gets EMFILE while the others
still get quotes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cove.daemon import attestation
from cove.platform import devattest, monitor
from cove.platform.state import Paths
from tests.conftest import ROOT, require
from tests.daemon.conftest import node_server_processes, parent_pid

IDENTITY = {
    "measurement": "0a" * 32,
    "signer": "0b" * 32,
    "product_id": 1,
    "svn": 2,
    "debug": False,
    "backend": "sim",
    "isolation": "namespaces+seccomp",
    "instance_id": "x",
}


def _servers(root: Path) -> list[int]:
    """The pids of node servers serving root's mount (only this test starts them); a server's fork (its
    mount watcher) is no server."""
    found = node_server_processes(root)
    return [pid for pid in found if parent_pid(pid) not in found]


def _stop(root: Path) -> None:
    for pid in _servers(root):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _servers(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    devattest.unmount(str(root / "attestation"))


@pytest.fixture(scope="module")
def platform_dir(tmp_path_factory) -> Iterator[Path]:
    """A platform of the tests' own, made before any server loads it; children find it in the environment."""
    require("fusermount3")
    directory = tmp_path_factory.mktemp("node-platform") / "platform"
    monitor.signer(Paths(directory))
    before = os.environ.get("COVE_PLATFORM_DIR")
    os.environ["COVE_PLATFORM_DIR"] = str(directory)
    yield directory
    if before is None:
        del os.environ["COVE_PLATFORM_DIR"]
    else:
        os.environ["COVE_PLATFORM_DIR"] = before


def _fresh_root() -> Path:
    """A daemon root others may traverse (0755), as a probe mount would sit under; the real one is 0700."""
    root = Path(tempfile.mkdtemp(prefix="cove-node-attest-"))
    root.chmod(0o755)
    (root / "attestation").mkdir(mode=0o755)
    return root


@pytest.fixture
def fresh_root(platform_dir) -> Iterator[Path]:
    root = _fresh_root()
    try:
        yield root
    finally:
        _stop(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def server(platform_dir) -> Iterator[tuple[Path, str]]:
    """(root, control socket) of one running node server, shared by the tests that do not restart it."""
    root = _fresh_root()
    try:
        yield root, attestation.ensure_server(root)
    finally:
        _stop(root)
        shutil.rmtree(root, ignore_errors=True)


def _register(control: str, name: str) -> Path:
    answer = attestation.request(
        control, {"op": "register", "instance_id": name, "identity": IDENTITY, "owner": os.getpid()}
    )
    assert answer.get("ok"), answer
    return Path(answer["path"])


def test_starters_at_once_get_one_server_that_stays_reachable(fresh_root):
    controls: list[object] = []

    def start() -> None:
        try:
            controls.append(attestation.ensure_server(fresh_root))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            controls.append(exc)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert controls == [str(fresh_root / "attestation.sock")] * 3, controls
    pid = attestation.request(str(fresh_root / "attestation.sock"), {"op": "status"})["pid"]
    # a second server, had one started, leaves (displaced) or stays: either way more than one was seen
    deadline = time.monotonic() + 5
    while (servers := _servers(fresh_root)) != [pid] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert servers == [pid]
    assert attestation.request(str(fresh_root / "attestation.sock"), {"op": "status"})["pid"] == pid
    assert os.path.ismount(fresh_root / "attestation")


def test_a_registration_belongs_to_the_process_that_connected(server):
    _, control = server
    # the registering process names another pid (the test's, alive), as one in another pid namespace would
    script = (
        "import json, sys; from cove.daemon.attestation import request; "
        "m = json.loads(sys.argv[1]); print(json.dumps(request(sys.argv[2], m)))"
    )
    message = {"op": "register", "instance_id": "peer-gone", "identity": IDENTITY, "owner": os.getpid()}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(message), control], capture_output=True, text=True, cwd=ROOT
    )
    assert json.loads(done.stdout)["ok"], done.stderr
    attestation.request(control, {"op": "status"})  # the registrant has left: this request's reap drops it
    kept = _register(control, "peer-alive")  # registered by this live process: kept
    try:
        attestation.request(control, {"op": "status"})
        names = sorted(p.name for p in kept.parent.iterdir())
        assert "peer-gone" not in names and "peer-alive" in names, names
    finally:
        attestation.request(control, {"op": "unregister", "instance_id": "peer-alive"})


PROBE = """
import errno, sys
folder = sys.argv[1]
for path, mode in ((folder + "/attestation_type", "rb"), (folder + "/user_report_data", "wb")):
    try:
        with open(path, mode) as f:
            f.write(bytes(64)) if "w" in mode else f.read()
        print("open", path)
    except OSError as exc:
        print(errno.errorcode[exc.errno], path)
"""


def test_a_host_process_other_than_root_is_refused(server):
    _, control = server
    folder = _register(control, "host-probe")
    try:
        assert (folder / "attestation_type").read_bytes() == b"cove"  # root in the host's namespace may look
        done = subprocess.run(
            ["/usr/bin/python3", "-c", PROBE, str(folder)], user=65534, group=65534, capture_output=True, text=True
        )
        results = [line.split()[0] for line in done.stdout.splitlines()]
        assert results == ["EACCES", "EACCES"], done.stdout + done.stderr
    finally:
        attestation.request(control, {"op": "unregister", "instance_id": "host-probe"})


def test_one_enclave_holding_many_files_gets_emfile_and_the_others_still_quote(server):
    _, control = server
    busy, calm = _register(control, "busy"), _register(control, "calm")
    held = []
    try:
        for _ in range(attestation.MAX_HANDLES):
            held.append(os.open(busy / "attestation_type", os.O_RDONLY))
        with pytest.raises(OSError) as refused:
            os.open(busy / "attestation_type", os.O_RDONLY)
        assert refused.value.errno == errno.EMFILE
        assert len((calm / "quote").read_bytes()) > 64  # another enclave is served meanwhile
        os.close(held.pop())
        deadline = time.monotonic() + 5  # RELEASE reaches the server after close returns
        while True:
            try:
                held.append(os.open(busy / "attestation_type", os.O_RDONLY))
                break
            except OSError as exc:
                assert exc.errno == errno.EMFILE and time.monotonic() < deadline
                time.sleep(0.01)
    finally:
        for fd in held:
            os.close(fd)
        for name in ("busy", "calm"):
            attestation.request(control, {"op": "unregister", "instance_id": name})
