"""With the node service's /dev/attestation server running, containers use it instead of a server of their own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from cove.daemon import attestation
from tests.oci.helpers import IMAGE, RUN_OPTIONS, RUNTIME, SPEC, podman, wait_stopped, write_spec


@pytest.fixture
def node_root(tmp_path):
    root = tmp_path / "node"
    root.mkdir(mode=0o700)
    control = attestation.ensure_server(root)
    yield root
    pid = attestation.request(control, {"op": "status"})["pid"]
    os.kill(pid, signal.SIGTERM)
    for _ in range(200):
        if not os.path.exists(f"/proc/{pid}"):
            break
        time.sleep(0.05)


def test_the_node_server_answers_the_container(bundle, node_root, tmp_path):
    spec = json.loads(json.dumps(SPEC))
    spec["process"]["args"] = [
        "/bin/sh",
        "-c",
        "head -c 64 /dev/zero > /dev/attestation/user_report_data; "
        "cat /dev/attestation/attestation_type; echo; cat /dev/attestation/report | head -c 1",
    ]
    write_spec(bundle, spec)
    root = tmp_path / "state"
    env = dict(os.environ, COVE_NODE_ROOT=str(node_root))
    control = str(node_root / "attestation.sock")
    before = attestation.request(control, {"op": "status"})["requests"]
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        assert (
            subprocess.run(
                [RUNTIME, "--root", str(root), "create", "--bundle", str(bundle), "n"], stdout=out, stderr=err, env=env
            ).returncode
            == 0
        )
    assert subprocess.run([RUNTIME, "--root", str(root), "start", "n"], env=env).returncode == 0
    wait_stopped(root, "n", 0)
    assert (tmp_path / "out").read_bytes().startswith(b"cove\n\xa2"), (tmp_path / "err").read_text()  # a CBOR map
    after = attestation.request(control, {"op": "status"})["requests"]
    assert after != before  # the node's server answered, not one of the container's own
    assert subprocess.run([RUNTIME, "--root", str(root), "delete", "n"], env=env).returncode == 0


def test_podman_passes_the_node_root_as_a_runtime_flag(node_root, loaded):
    control = str(node_root / "attestation.sock")
    before = attestation.request(control, {"op": "status"})["requests"]
    result = podman(
        "run",
        "--rm",
        *RUN_OPTIONS,
        "--runtime-flag",
        f"node-root={node_root}",
        IMAGE,
        "/bin/sh",
        "-c",
        "cat /dev/attestation/report | head -c 1 > /dev/null",
    )
    assert result.returncode == 0, result.stderr
    assert attestation.request(control, {"op": "status"})["requests"] != before
