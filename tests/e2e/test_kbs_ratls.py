"""A key broker inside a real `sim` enclave, serving RA-TLS; clients verify it by its evidence.

The broker's instance holds Debian's python3.11, the Python packages the
broker imports (copied from the test's own environment) and Cove itself;
`cove run ... python3.11 -m cove kbs serve --ra-tls` makes a fresh TLS key
whose certificate carries the enclave's evidence from /dev/attestation. The
platform is one swtpm, so every piece of evidence here is TPM-rooted: the
broker's (in its certificate) and the clients' (attesting to the broker),
and both policies require the TPM. A client enclave provisions its secret
through `[attestation] kbs_policy`; `cove kbs get` runs in an enclave with
/dev/attestation; a policy naming another measurement, or a broker with a
plain certificate, is refused with one line.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cove import hostids
from cove.kbs.client import AdminClient
from tests.conftest import error_line, require
from tests.e2e.helpers import make_instance, set_option
from tests.e2e.test_kbs_provisioning import measurement
from tests.kbs.test_tpm_rooted import tpm_policy
from tests.platform.conftest import TpmPlatforms

SITE = "/opt/cove/lib"
# What `cove kbs serve` and `cove kbs get` import, by top-level name in site-packages.
IMPORTS = """
import sys, sysconfig
import cove.cli, cove.cli.kbs, cove.kbs.server, cove.kbs.runner, cove.kbs.client, cove.kbs.broker_ratls, cove.kbs.wire
import cove.attest.verifier, cove.attest.cove_evidence_verify, cove.attest.ratls
import uvicorn.main, uvicorn.loops.auto, uvicorn.lifespan.on, uvicorn.protocols.http.h11_impl, httpcore, certifi
site = sysconfig.get_paths()["purelib"]
names = {m.__file__[len(site) + 1:].split("/")[0] for m in list(sys.modules.values())
         if (getattr(m, "__file__", None) or "").startswith(site + "/")}
print("\\n".join(sorted(n for n in names if n != "cove")))
"""


def python_bom(folder: Path) -> Path:
    """A bom of python3.11, the broker's packages (from this environment) and Cove."""
    require("python3.11")
    import cove

    names = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, check=True).stdout.split()
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    entries = [
        '[[copy]]\nfrom = "/usr/bin/python3.11"\n',
        '[[copy]]\nfrom = "/usr/lib/python3.11"\n',
        f'[[copy]]\nfrom = "{Path(cove.__file__).parent}"\nto = "{SITE}"\n',
    ]
    entries += [f'[[copy]]\nfrom = "{site / name}"\nto = "{SITE}"\n' for name in names]
    bom = folder / "python.bom"
    bom.write_text("\n".join(entries))
    return bom


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, proc: subprocess.Popen, log: Path, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the broker enclave exited ({proc.returncode}):\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"the broker enclave did not listen within {seconds}s:\n{log.read_text()}")


class EnclaveBroker:
    """`cove kbs serve --ra-tls` in a sim enclave on a swtpm platform, and what clients need to trust it."""

    def __init__(self, cove, base: Path, platform):
        self.cove, self.platform = cove, platform
        self.env = {"COVE_PLATFORM_DIR": str(platform.dir)}
        self.state = base / "kbs-state"
        cove.ok("kbs", "init", "--state", self.state, "--tls-name", "localhost")
        (self.state / "policy.toml").write_text(tpm_policy([platform], pinned=platform))
        for path in (self.state, *self.state.rglob("*")):  # the enclave's host user (never host root)
            os.chown(path, *hostids.enclave_range().host(0, 0))
        self.instance = make_instance(
            cove,
            base,
            name="kbs",
            build=False,
            options={
                ("network", "mode"): '"host"',
                (
                    "env",
                    "default",
                ): f'{{ PATH = "/usr/bin:/bin", HOME = "/root", LANG = "C.UTF-8", PYTHONPATH = "{SITE}" }}',
            },
            extra=f'\n[[mounts]]\ntarget = "/state"\ntype = "host"\nsource = "{self.state}"\nwritable = true\n',
        )
        cove.ok("add", "--bom", python_bom(base), cwd=self.instance)
        set_option(self.instance / "cove.toml", "resources", "memory", '"1G"')
        cove.ok("build", cwd=self.instance, timeout=600)
        self.measurement = measurement(self.instance)
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.log = base / "kbs.log"

    def policy(self, folder: Path, measurement: str | None = None) -> Path:
        """A client's policy for this broker: TPM-rooted on this platform, this measurement."""
        path = folder / f"broker-{measurement or self.measurement}.toml"
        path.write_text(
            tpm_policy([self.platform], pinned=self.platform)
            + f'measurements = ["{measurement or self.measurement}"]\n'
        )
        return path

    def start(self) -> EnclaveBroker:
        args = self.cove.popen_args(
            "run",
            "/usr/bin/python3.11",
            "-m",
            "cove",
            "kbs",
            "serve",
            "--state",
            "/state",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--ra-tls",
            "--policy",
            "/state/policy.toml",
        )
        self.handle = open(self.log, "wb")
        self.proc = subprocess.Popen(
            args, cwd=self.instance, env=dict(self.cove.env, **self.env), stdout=self.handle, stderr=subprocess.STDOUT
        )
        wait_for(self.port, self.proc, self.log)
        return self

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.handle.close()


@pytest.fixture(scope="module")
def enclave_broker(cove, tmp_path_factory):
    base = tmp_path_factory.mktemp("ratls")
    platforms = TpmPlatforms(base / "platforms")
    try:
        broker = EnclaveBroker(cove, base, platforms.make("tpm")).start()
        try:
            broker.admin = AdminClient.from_file(
                broker.url, broker.state / "admin.json", broker_policy=broker.policy(base)
            )
            yield broker
            broker.admin.close()
        finally:
            broker.stop()
    finally:
        platforms.stop_all()


def client_config(url: str, policy: Path) -> str:
    return f'''
[[mounts]]
target = "/run/secrets"
type = "tmpfs"

[attestation]
kbs = "{url}"
kbs_policy = "{policy}"
retries = 0

[[secrets]]
name = "db"
resource = "app/db/password"
target = "file:/run/secrets/db"
'''


def test_enclave_provisioned_from_an_enclave_broker(cove, tmp_path, enclave_broker):
    broker = enclave_broker
    instance = make_instance(cove, tmp_path, extra=client_config(broker.url, broker.policy(tmp_path)))
    broker.admin.put_policy("app", f'types = ["cove"]\n[cove]\nmeasurements = ["{measurement(instance)}"]\n')
    broker.admin.create_secret("app/db/password", "data", "app", value=b"from an enclave broker")
    result = cove.ok("run", "/bin/cat", "/run/secrets/db", cwd=instance, env=broker.env)
    assert result.stdout == "from an enclave broker"
    attested = [r for r in broker.admin.audit(action="attest") if r["outcome"] == "ok"]
    assert measurement(instance) in {r["measurement"] for r in attested}

    # The same enclave, built to trust another broker measurement: the TLS check refuses, nothing is sent.
    other = tmp_path / "other"
    other.mkdir()
    wrong = make_instance(cove, other, extra=client_config(broker.url, broker.policy(other, "00" * 32)))
    refused = cove("run", "/bin/cat", "/run/secrets/db", cwd=wrong, env=broker.env)
    assert refused.returncode != 0 and "from an enclave broker" not in refused.stdout
    line = error_line(refused)
    assert "failed RA-TLS verification" in line and broker.measurement in line


def test_kbs_get_inside_an_enclave_with_dev_attestation(cove, tmp_path, enclave_broker):
    """`cove kbs get` in an enclave of the broker's image: TPM-rooted evidence from /dev/attestation."""
    broker = enclave_broker
    policy = broker.policy(broker.state)  # the client enclave reads it through the /state mount
    broker.admin.put_policy("kbs-image", f'types = ["cove"]\n[cove]\nmeasurements = ["{broker.measurement}"]\n')
    broker.admin.create_secret("app/api/token", "data", "kbs-image", value=b"via /dev/attestation")
    result = cove.ok(
        "run",
        "/usr/bin/python3.11",
        "-m",
        "cove",
        "kbs",
        "get",
        broker.url,
        "app/api/token",
        "--kbs-policy",
        f"/state/{policy.name}",
        cwd=broker.instance,
        env=broker.env,
    )
    assert result.stdout == "via /dev/attestation"
    released = [r for r in broker.admin.audit(action="release") if r["resource"] == "app/api/token@1"]
    assert released and released[-1]["outcome"] == "ok" and released[-1]["measurement"] == broker.measurement


def test_kbs_get_refuses_another_measurement(cove, tmp_path, enclave_broker):
    broker = enclave_broker
    result = cove(
        "kbs",
        "get",
        broker.url,
        "app/db/password",
        "--tee",
        "sample",
        "--kbs-policy",
        broker.policy(tmp_path, "ab" * 32),
    )
    assert result.returncode != 0 and not result.stdout
    line = error_line(result)
    assert "failed RA-TLS verification" in line
    assert f"measurement {broker.measurement}" in line and "is not one the policy accepts" in line
