"""The node agent: labels from the node service's answer, published as an NFD feature file."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from cove import __version__
from cove.k8s import nodeagent
from cove.k8s.health import DaemonProbe, Health
from tests.conftest import COVE
from tests.k8s.fakes import FakeDaemon


def _read(folder: Path) -> dict[str, str]:
    lines = (folder / "cove").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_labels_follow_the_node_service_and_write_atomically(tmp_path):
    sock_dir = Path(tempfile.mkdtemp(prefix="k8s-na-", dir="/tmp"))
    daemon = FakeDaemon(sock_dir / "cove.sock")
    daemon.start()
    features = tmp_path / "features.d"
    proc = subprocess.Popen(
        [
            COVE,
            "k8s",
            "node-agent",
            "--nfd-dir",
            str(features),
            "--backend",
            "vm",
            "--platform",
            "self-certified",
            "--daemon-socket",
            str(sock_dir / "cove.sock"),
            "--interval",
            "0.1",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not (features / "cove").exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        assert _read(features) == {
            "cove.dev/backend": "vm",
            "cove.dev/platform": "self-certified",
            "cove.dev/version": "0.1.0",
            "cove.dev/ready": "true",
        }
        daemon.stop()
        while _read(features).get("cove.dev/ready") != "false":
            assert time.monotonic() < deadline + 10
            time.sleep(0.05)
        assert [p.name for p in features.iterdir()] == ["cove"]  # no temporary left behind
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        daemon.stop()
    assert proc.returncode == 0


@pytest.mark.parametrize(
    "info,expected",
    [
        ({"backend": "sgx", "platform": "tpm", "version": "1.2.3"}, ("sgx", "tpm", "1.2.3")),
        ({"version": "1.2.3+dirty build"}, ("sim", "self-certified", "unknown")),  # not a label value
    ],
)
def test_the_node_service_has_the_last_word(tmp_path, info, expected):
    values = nodeagent.labels(Health(True, "ok", info), dev=tmp_path)
    assert (values["cove.dev/backend"], values["cove.dev/platform"], values["cove.dev/version"]) == expected


def test_detection_without_the_node_service(tmp_path):
    (tmp_path / "kvm").touch()
    (tmp_path / "tpmrm0").touch()
    values = nodeagent.labels(Health(False, "down", {}), dev=tmp_path)
    assert values == {
        "cove.dev/backend": "vm",
        "cove.dev/platform": "tpm",
        "cove.dev/version": __version__,
        "cove.dev/ready": "false",
    }


HOSTILE_ANSWERS = {
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, "not JSON"),  # was a RecursionError out of the probe
    "trailing garbage": (b'{"version": "0.1.0", "api": "v1"} {}', "not JSON"),
    "wrong top-level type": (b'["0.1.0"]', "not a JSON object"),
    "wrong field type": (b'{"version": {"major": 0}, "api": "v1"}', "version must be a short text string"),
}


@pytest.mark.parametrize("case", HOSTILE_ANSWERS)
def test_a_hostile_version_answer_is_down_with_a_reason(case):
    """The probe reads the answer through cove.decode: each is down with one line, never an exception."""
    answer, words = HOSTILE_ANSWERS[case]
    sock = Path(tempfile.mkdtemp(prefix="k8s-hp-", dir="/tmp")) / "cove.sock"
    daemon = FakeDaemon(sock, answer)
    daemon.start()
    try:
        health = DaemonProbe(str(sock))()
    finally:
        daemon.stop()
    assert not health.up and words in health.detail and health.info == {} and "\n" not in health.detail


def test_a_hostile_answer_is_refused():
    with pytest.raises(ValueError):
        nodeagent.labels(Health(True, "ok", {"backend": "root\nx=y"}))


@pytest.mark.parametrize(
    "args,code,words",
    [
        ([], 2, "exactly one of --nfd-dir and --node"),
        (["--node", "n1"], 7, "no Kubernetes API credentials"),
        (["--backend", "bogus", "--nfd-dir", "/tmp/x"], 2, "bogus"),
    ],
)
def test_bad_invocations_are_one_line(tmp_path, args, code, words):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [COVE, "k8s", "node-agent", "--once", *args], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.count("\n") == 1 and words in proc.stderr
