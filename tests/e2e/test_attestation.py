"""Remote attestation end to end: programs in sim enclaves read /dev/attestation; `cove verify` appraises.

Each test uses a private platform folder (COVE_PLATFORM_DIR); the enclave
program is a small C program doing plain file I/O, as any language would,
and one test uses the Python SDK inside an enclave.
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timedelta, timezone

import pytest

from cove.attest.cove_evidence_verify import verify_cove_evidence
from cove.platform.state import Paths
from cove.platform.swtpm import SwTpm
from tests.conftest import ROOT, error_line, require
from tests.e2e.helpers import make_instance, set_option


@pytest.fixture(scope="session")
def attest_probe(tmp_path_factory):
    require("gcc")
    out = tmp_path_factory.mktemp("attest-probe") / "attest_probe"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(ROOT / "tests" / "e2e" / "attest_probe.c")], check=True)
    return out


@pytest.fixture
def env(tmp_path):
    return {"COVE_PLATFORM_DIR": str(tmp_path / "platform")}


def build(cove, parent, probe, name="app", extra_file: str | None = None):
    root = make_instance(cove, parent, name=name, build=False)
    cove.ok("add", "--to", "/bin", probe, cwd=root)
    if extra_file:
        (parent / f"{name}-marker").write_text(extra_file)
        cove.ok("add", "--to", "/etc", parent / f"{name}-marker", cwd=root)
    cove.ok("build", cwd=root)
    return root


def measurement(cove, root) -> str:
    return json.loads(cove.ok("inspect", "--json", cwd=root).stdout)["measurement"]


def quote(cove, root, env, report_data: bytes, tmp_path, name="evidence.hex"):
    out = cove.ok("run", "/bin/attest_probe", "quote", report_data.hex(), cwd=root, env=env).stdout.strip()
    path = tmp_path / name
    path.write_text(out)
    return path


def policy(tmp_path, text, name="policy.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_dev_attestation_is_in_every_enclave(cove, attest_probe, tmp_path, env):
    root = build(cove, tmp_path, attest_probe)
    listing = cove.ok("run", "/bin/ls", "/dev/attestation", cwd=root, env=env).stdout.split()
    assert listing == ["attestation_type", "keys", "quote", "report", "user_report_data"]
    assert cove.ok("run", "/bin/attest_probe", "type", cwd=root, env=env).stdout.strip() == "cove"
    # Writing anything but 64 bytes of report data fails; the evidence files are read-only.
    assert cove("run", "/bin/attest_probe", "badwrite", cwd=root, env=env).returncode == 0
    denied = cove("run", "/bin/sh", "-c", "echo x > /dev/attestation/quote", cwd=root, env=env)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr


def test_verify_accepts_and_rejects_as_the_policy_says(cove, attest_probe, tmp_path, env):
    root = build(cove, tmp_path, attest_probe)
    m = measurement(cove, root)
    nonce = os.urandom(32)
    evidence = quote(cove, root, env, nonce, tmp_path)
    names_it = policy(tmp_path, f'[cove]\nself_certified = true\nmeasurements = ["{m}"]\n')
    ok = cove("verify", evidence, "--nonce", nonce.hex(), "--policy", names_it)
    assert ok.returncode == 0, ok.stderr
    assert f"measurement: {m}" in ok.stdout and "self-certified" in ok.stdout

    other = policy(tmp_path, f'[cove]\nself_certified = true\nmeasurements = ["{"ab" * 32}"]\n', "other.toml")
    result = cove("verify", evidence, "--nonce", nonce.hex(), "--policy", other)
    assert result.returncode == 6 and f"measurement {m} is not one the policy accepts" in error_line(result)

    result = cove("verify", evidence, "--nonce", nonce.hex())  # the default policy
    assert result.returncode == 6 and "platform key is self-certified" in error_line(result)

    result = cove("verify", evidence, "--nonce", os.urandom(32).hex(), "--policy", names_it)
    assert result.returncode == 6 and "does not start with the nonce" in error_line(result)

    expected = nonce + bytes(32)
    assert cove("verify", evidence, "--report-data", expected.hex(), "--policy", names_it).returncode == 0
    result = cove("verify", evidence, "--report-data", (b"\x01" + expected[1:]).hex(), "--policy", names_it)
    assert result.returncode == 6 and "report data does not match the expected value" in error_line(result)


def test_replay_after_max_age_is_rejected(cove, attest_probe, tmp_path, env):
    root = build(cove, tmp_path, attest_probe)
    nonce = os.urandom(16)
    evidence = quote(cove, root, env, nonce, tmp_path)
    issued = verify_cove_evidence(bytes.fromhex(evidence.read_text()), datetime.now(timezone.utc)).report.timestamp
    fresh = policy(tmp_path, '[freshness]\nnonce = "required"\nmax_age = "60s"\n[cove]\nself_certified = true\n')
    soon = (issued + timedelta(seconds=30)).isoformat()
    later = (issued + timedelta(minutes=5)).isoformat()
    assert cove("verify", evidence, "--nonce", nonce.hex(), "--policy", fresh, "--time", soon).returncode == 0
    replayed = cove("verify", evidence, "--nonce", nonce.hex(), "--policy", fresh, "--time", later)
    assert replayed.returncode == 6 and "evidence is 300s old; the policy allows at most 60s" in error_line(replayed)
    no_nonce = cove("verify", evidence, "--policy", fresh, "--time", soon)
    assert no_nonce.returncode == 6 and "requires a nonce" in error_line(no_nonce)


def test_an_enclave_only_gets_its_own_measurement(cove, attest_probe, tmp_path, env):
    a = build(cove, tmp_path, attest_probe, "a", extra_file="a")
    b = build(cove, tmp_path, attest_probe, "b", extra_file="b")
    ma, mb = measurement(cove, a), measurement(cove, b)
    assert ma != mb
    now = datetime.now(timezone.utc)
    for root, m in ((a, ma), (b, mb)):
        evidence = bytes.fromhex(quote(cove, root, env, b"x", tmp_path, f"{m}.hex").read_text())
        report = verify_cove_evidence(evidence, now).report
        assert report.measurement.hex() == m and report.backend == "sim"
        assert report.isolation == "namespaces+seccomp"
    # The report's identity fields come from the runtime; the enclave chose only report data.
    c = verify_cove_evidence(bytes.fromhex(quote(cove, a, env, b"\xff" * 64, tmp_path).read_text()), now).report
    assert c.report_data == b"\xff" * 64 and c.measurement.hex() == ma and c.instance_id


def test_debug_enclaves_are_refused_by_default(cove, attest_probe, tmp_path, env):
    root = make_instance(cove, tmp_path, name="dbg", options={("enclave", "debug"): "true"}, build=False)
    cove.ok("add", "--to", "/bin", attest_probe, cwd=root)
    cove.ok("build", cwd=root)
    evidence = quote(cove, root, env, b"n", tmp_path)
    relaxed = policy(tmp_path, "[cove]\nself_certified = true\n")
    result = cove("verify", evidence, "--policy", relaxed)
    assert result.returncode == 6 and "debug enclave" in error_line(result)
    allowed = policy(tmp_path, "[cove]\nself_certified = true\ndebug = true\n", "debug.toml")
    assert cove("verify", evidence, "--policy", allowed).returncode == 0


def test_sealing_keys_follow_the_identity(cove, attest_probe, tmp_path, env):
    a = build(cove, tmp_path, attest_probe, "a", extra_file="a")
    b = build(cove, tmp_path, attest_probe, "b", extra_file="b")
    key = lambda root, p: cove.ok("run", "/bin/attest_probe", "key", p, cwd=root, env=env).stdout.strip()  # noqa: E731
    assert len(bytes.fromhex(key(a, "mrenclave"))) == 16
    assert key(a, "mrenclave") == key(a, "mrenclave")
    assert key(a, "mrenclave") != key(b, "mrenclave")
    assert key(a, "mrsigner") == key(b, "mrsigner")  # same signer key, same product id


@pytest.fixture
def swtpm_env(cove, tmp_path):
    require("swtpm")
    require("tpm2_quote")
    directory = tmp_path / "tpm-platform"
    env = {"COVE_PLATFORM_DIR": str(directory)}
    yield env
    SwTpm(Paths(directory).swtpm).stop()


def test_tpm_rooted_enclave_evidence(cove, attest_probe, tmp_path, swtpm_env):
    init = cove.ok("platform", "init", "--swtpm", "--json", env=swtpm_env)
    state = json.loads(init.stdout)
    assert state["root"] == "tpm" and state["tpm"]["pcr_matches_quote"]
    root = build(cove, tmp_path, attest_probe)
    m = measurement(cove, root)
    nonce = os.urandom(32)
    evidence = quote(cove, root, swtpm_env, nonce, tmp_path)
    # The runtime the platform measured (the source tree may change under a long test run).
    runtime = verify_cove_evidence(
        bytes.fromhex(evidence.read_text()),
        datetime.now(timezone.utc),
        ek_roots=open(state["tpm"]["ek_root"], "rb").read(),
        ak_roots=open(state["tpm"]["ak_ca_certificate"], "rb").read(),
    ).runtime
    pcrs = "\n".join(
        f'{i} = "{v}"' for i, v in state["tpm"]["quoted_pcrs"].items() if i.endswith(":0") or i.endswith(":7")
    )
    pcrs = pcrs.replace("sha256:", "")
    accepted = policy(
        tmp_path,
        f'[cove]\nmeasurements = ["{m}"]\nek_ca = ["{state["tpm"]["ek_root"]}"]\n'
        f'ak_ca = ["{state["tpm"]["ak_ca_certificate"]}"]\n'
        f'runtime_hashes = ["{runtime.hex()}"]\n[cove.pcrs.sha256]\n{pcrs}\n',
    )
    ok = cove("verify", evidence, "--nonce", nonce.hex(), "--policy", accepted)
    assert ok.returncode == 0, ok.stderr
    assert "cove evidence (TPM-rooted)" in ok.stdout
    wrong_pcr = policy(
        tmp_path, accepted.read_text().replace(state["tpm"]["quoted_pcrs"]["sha256:7"], "11" * 32), "pcr.toml"
    )
    result = cove("verify", evidence, "--nonce", nonce.hex(), "--policy", wrong_pcr)
    assert result.returncode == 6 and "PCR sha256:7 is" in error_line(result)
    other_runtime = policy(tmp_path, accepted.read_text().replace(runtime.hex(), "00" * 32), "runtime.toml")
    result = cove("verify", evidence, "--nonce", nonce.hex(), "--policy", other_runtime)
    assert result.returncode == 6 and f"Cove runtime {runtime.hex()} is not one the policy accepts" in error_line(
        result
    )


def test_python_sdk_inside_an_enclave(cove, tmp_path, env):
    require("python3.11")
    root = make_instance(cove, tmp_path, name="py", build=False)
    cove.ok("add", "--bom", ROOT / "examples" / "python" / "cove.bom", cwd=root)
    lib = tmp_path / "lib" / "cove"
    lib.mkdir(parents=True)
    for name in ("__init__.py", "enclave.py"):
        (lib / name).write_bytes((ROOT / "src" / "cove" / name).read_bytes())
    (tmp_path / "sdk_app.py").write_text(
        "import sys\nsys.path.insert(0, '/app/lib')\nfrom cove import enclave\n"
        "nonce = bytes.fromhex(sys.argv[1])\n"
        "print(enclave.attestation_type())\n"
        "print(enclave.get_evidence(nonce).hex())\n"
        "print(enclave.get_seal_key('mrsigner').hex())\n"
        "try:\n    enclave.get_evidence(bytes(65))\nexcept enclave.AttestationError as e:\n    print('refused:', e)\n"
    )
    cove.ok("add", "--to", "/app", tmp_path / "sdk_app.py", cwd=root)
    cove.ok("add", "--to", "/app/lib", tmp_path / "lib" / "cove", cwd=root)
    set_option(root / "cove.toml", "process", "entry_points", '["/usr/bin/python3.11"]')
    cove.ok("build", cwd=root)
    nonce = os.urandom(24)
    out = cove.ok("run", "/usr/bin/python3.11", "/app/sdk_app.py", nonce.hex(), cwd=root, env=env).stdout.splitlines()
    assert (
        out[0] == "cove"
        and len(bytes.fromhex(out[2])) == 16
        and out[3].startswith("refused: report data is at most 64")
    )
    report = verify_cove_evidence(bytes.fromhex(out[1]), datetime.now(timezone.utc)).report
    assert report.report_data == nonce + bytes(40) and report.measurement.hex() == measurement(cove, root)


def _attestation_mounts(under) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(under))]


def test_the_attestation_server_dies_with_its_launcher(cove, attest_probe, tmp_path, env):
    import signal
    import time

    runtime = tmp_path / "runtime"
    runtime.mkdir()
    root = build(cove, tmp_path, attest_probe)
    run_env = dict(cove.env, COVE_RUNTIME_DIR=str(runtime), **env)
    proc = subprocess.Popen(
        [*cove.popen_args("run", "/bin/sh", "-c", "echo up; exec sleep 60")],
        cwd=root,
        env=run_env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline() == "up\n"
        assert len(_attestation_mounts(runtime)) == 1
        os.kill(proc.pid, signal.SIGKILL)  # no chance to stop its services
        proc.wait()
        deadline = time.monotonic() + 10
        while _attestation_mounts(runtime) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _attestation_mounts(runtime) == [], "the /dev/attestation mount outlived cove run"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
