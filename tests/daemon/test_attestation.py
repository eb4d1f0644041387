"""/dev/attestation served by the node's one server: each enclave sees only its own identity."""

from __future__ import annotations

import subprocess
import time

import cbor2
import pytest

from tests.conftest import ROOT, require


@pytest.fixture(scope="module")
def attest_probe(tmp_path_factory):
    require("gcc")
    out = tmp_path_factory.mktemp("attest-probe") / "attest_probe"
    subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(out), str(ROOT / "tests" / "e2e" / "attest_probe.c")], check=True
    )
    return out


@pytest.fixture(scope="module")
def pair(node, attest_probe, tmp_path_factory):
    """Two instances with different measurements, with a shell to try what an attacker inside would."""
    parent = tmp_path_factory.mktemp("pair")
    c = node.cove
    made = []
    for name in ("alpha", "beta"):
        c.ok("new", name, cwd=parent)
        c.ok("add", "/bin/sh", "/bin/cat", "/bin/ls", "/bin/sleep", cwd=parent / name)
        c.ok("add", "--to", "/bin", str(attest_probe), cwd=parent / name)
        (parent / name / "image" / "who").write_text(name)
        c.ok("build", cwd=parent / name)
        made.append(parent / name)
    return made


def _claims(report_hex: str) -> dict:
    signed = cbor2.loads(bytes.fromhex(report_hex))
    body = signed.get("report", signed) if isinstance(signed, dict) else signed
    return cbor2.loads(body) if isinstance(body, bytes) else body


def test_two_enclaves_cannot_speak_for_each_other(node, pair):
    c = node.cove
    alpha, beta = pair
    script = (
        "sleep 2; /bin/attest_probe report 00ff; ls -a /dev/attestation/..; "
        "cat /dev/attestation/../*/report 2>&1 | head -c 0; ls /dev/attestation/../*/ 2>&1; echo end"
    )
    ids = [
        c.ok("run", "-d", "--name", f"speak-{i}", "/bin/sh", "-c", script, cwd=root).stdout.strip()
        for i, root in enumerate(pair)
    ]
    views = [node.until(ident, "running") for ident in ids]
    # the node's server holds one folder per enclave; root in the host's namespace may look (a second
    # pid namespace, as another enclave would be, is refused once the owner has bound its folder)
    deadline = time.monotonic() + 20
    while len(folders := sorted(p.name for p in (node.root / "attestation").iterdir())) < 2:
        assert time.monotonic() < deadline, folders
        time.sleep(0.05)
    for view in views:
        node.until(view["id"], "exited")
    outputs = [c.ok("logs", ident).stdout for ident in ids]
    measurements = [node.state(ident)["measurement"] for ident in ids]
    assert measurements[0] != measurements[1]
    for output, measurement, other in zip(outputs, measurements, reversed(measurements)):
        lines = output.splitlines()
        report = lines[0]
        assert measurement in report.lower() or bytes.fromhex(measurement).hex() in report
        assert bytes.fromhex(other).hex() not in report  # never the other enclave's identity
        listing = " ".join(lines[1:])
        assert "attestation" in listing and not any(f in listing for f in folders)  # only its own, as /dev/attestation
        assert lines[-1] == "end"
    for ident in ids:
        c.ok("rm", ident)
    assert _scraped(node, "ok") >= 2  # the reports, counted by the node's server


def _scraped(node, outcome: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://{node.metrics}/metrics", timeout=10).read().decode()
    prefix = f'cove_attestation_requests_total{{outcome="{outcome}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def test_another_pid_namespace_is_refused(node, pair):
    c = node.cove
    alpha, _ = pair
    ident = c.ok(
        "run", "-d", "--name", "owner", "/bin/sh", "-c", "cat /dev/attestation/attestation_type; sleep 60", cwd=alpha
    ).stdout.strip()
    node.until(ident, "running")
    deadline = time.monotonic() + 20
    while "cove" not in c.ok("logs", ident).stdout and time.monotonic() < deadline:
        time.sleep(0.05)
    folder = next(p for p in (node.root / "attestation").iterdir())
    for p in (node.root / "attestation").iterdir():
        folder = p  # the newest registration
    unshare = require("unshare")
    outsider = subprocess.run(
        [unshare, "--pid", "--fork", "--mount-proc", "cat", str(folder / "attestation_type")],
        capture_output=True,
        text=True,
    )
    assert outsider.returncode != 0 and "Permission denied" in outsider.stderr
    c.ok("rm", "-f", ident)


def test_exec_joins_the_enclave(node, pair):
    """cove exec: same pid namespace, identity, seccomp filter and no capabilities; refusals in one line."""
    from tests.conftest import error_line

    c = node.cove
    alpha, _ = pair
    ident = c.ok("run", "-d", "--name", "host", "/bin/sleep", "60", cwd=alpha).stdout.strip()
    node.until(ident, "running")
    deadline = time.monotonic() + 20
    while c("exec", "host", "/bin/ls", "/dev/attestation").returncode != 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    status = c.ok("exec", "host", "/bin/cat", "/proc/self/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Seccomp"].strip() == "2" and fields["NoNewPrivs"].strip() == "1"
    assert all(fields[k].strip() == "0000000000000000" for k in ("CapEff", "CapPrm", "CapBnd", "CapInh"))
    assert "sleep" in c.ok("exec", "host", "/bin/cat", "/proc/1/cmdline").stdout  # the enclave's pid 1
    report = c.ok("exec", "host", "/bin/attest_probe", "report", "00ff").stdout.strip()
    assert node.state("host")["measurement"] in report  # the enclave's own identity
    assert c("exec", "host", "/bin/sh", "-c", "exit 7").returncode == 7
    missing = c("exec", "host", "/bin/nothing")
    assert missing.returncode == 127 and "No such file" in error_line(missing)
    outside = c("exec", "host", "/who")
    assert outside.returncode == 2 and "not an entry point" in error_line(outside)
    c.ok("stop", "-t", "1", "host")
    ended = c("exec", "host", "/bin/ls")
    assert ended.returncode == 2 and "not running" in error_line(ended)
    c.ok("rm", "host")


@pytest.mark.parametrize(
    "line",
    [
        b"[" * 100_000 + b"\n",
        b'{"op": "status"} trailing\n',
        b'[{"op": "status"}]\n',
        b'{"op": "register", "instance_id": "x", "identity": [], "owner": "1"}\n',
    ],
    ids=["deep-nesting", "trailing-garbage", "wrong-top-level-type", "wrong-field-type"],
)
def test_hostile_control_messages_are_refused_and_the_server_goes_on(node, line):
    """A malformed control message gets {"ok": false}; it used to kill the server's control thread."""
    import json
    import socket

    from cove.daemon.attestation import ensure_server, request

    control = ensure_server(node.root)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(control)
        sock.sendall(line)
        answer = sock.makefile("rb").readline()
    assert json.loads(answer)["ok"] is False
    assert request(control, {"op": "status"}, timeout=5)["ok"] is True
