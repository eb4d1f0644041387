"""Provisioning into a real Cove enclave: `cove run` attests to a broker before the program starts.

The broker runs in the test process over HTTPS on loopback; the enclave is a
real `sim` enclave started by the `cove` command. The platform is a private,
self-certified one (COVE_PLATFORM_DIR), which the broker's attestation
policy accepts explicitly.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from joserfc import jwk

from cove.kbs import client as kbs_client
from cove.kbs import tls
from cove.kbs.broker import Broker, Settings
from cove.kbs.runner import EmbeddedBroker
from tests.conftest import error_line
from tests.e2e.helpers import make_instance

COVE_POLICY = 'types = ["cove"]\n[cove]\nself_certified = true\n'


@pytest.fixture
def platform_env(tmp_path):
    folder = tmp_path / "platform"
    folder.mkdir(mode=0o700)
    return {"COVE_PLATFORM_DIR": str(folder)}


def running_broker(tmp_path: Path):
    """A real broker over TLS on loopback with a root admin (``.admin``, ``.ca``); stopped after the yield."""
    ca, cert, key = tls.make_local_tls(tmp_path / "tls")
    running = EmbeddedBroker(
        Broker(
            Settings(
                db_url=f"sqlite:///{tmp_path / 'kbs.db'}", master_key=os.urandom(32), attestation_policy=COVE_POLICY
            )
        ),
        cert,
        key,
    ).start()
    admin_key = jwk.generate_key("EC", "P-256")
    running.broker.bootstrap_admin("root", admin_key.as_dict(private=False))
    admin = kbs_client.AdminClient(running.url, admin_key, "root", ca, running.broker.audience)
    running.admin, running.ca = admin, ca
    yield running
    admin.close()
    running.stop()


@pytest.fixture
def broker(tmp_path, platform_env):
    yield from running_broker(tmp_path)


def secrets_config(url: str, ca: Path, extra: str = "") -> str:
    return f'''
[[mounts]]
target = "/run/secrets"
type = "tmpfs"

[attestation]
kbs = "{url}"
ca = "{ca}"
retries = 0

[[secrets]]
name = "db"
resource = "app/db/password"
target = "file:/run/secrets/db"

[[secrets]]
name = "token"
resource = "app/api/token"
target = "env:API_TOKEN"
{extra}'''


def measurement(instance: Path) -> str:
    return hashlib.sha256((instance / "build" / "manifest.cbor").read_bytes()).hexdigest()


def release_to(broker, instance: Path, name: str = "app") -> None:
    broker.admin.put_policy(
        name, f'types = ["cove"]\n[cove]\nmeasurements = ["{measurement(instance)}"]\nself_certified = true\n'
    )


def test_secrets_reach_the_program(cove, tmp_path, broker, platform_env):
    started = time.time()
    instance = make_instance(cove, tmp_path, extra=secrets_config(broker.url, broker.ca))
    release_to(broker, instance)
    broker.admin.create_secret("app/db/password", "data", "app", value=b"correct horse")
    broker.admin.create_secret("app/api/token", "password", "app", exportable=False)
    result = cove.ok(
        "run",
        "/bin/sh",
        "-c",
        'cat /run/secrets/db; echo; echo "token=$API_TOKEN"; '
        "ls -l /run/secrets/db; echo hi > /run/secrets/db 2>/dev/null || echo read-only",
        cwd=instance,
        env=platform_env,
    )
    lines = result.stdout.splitlines()
    assert lines[0] == "correct horse"
    assert lines[1].startswith("token=") and len(lines[1]) == len("token=") + 32
    assert lines[-1] == "read-only"
    releases = [r for r in broker.admin.audit(action="release") if r["outcome"] == "ok"]
    assert {r["resource"] for r in releases} == {"app/db/password@1", "app/api/token@1"}
    assert all(r["measurement"] == measurement(instance) for r in releases)
    # nothing of the secret stays on the host
    leftovers = [p for p in Path("/dev/shm").glob("cove-enclave-*") if p.stat().st_mtime >= started]
    for folder in leftovers:
        assert not list(folder.glob("secrets/*")), folder


def test_wrong_measurement_program_does_not_start(cove, tmp_path, broker, platform_env):
    instance = make_instance(cove, tmp_path, extra=secrets_config(broker.url, broker.ca))
    broker.admin.put_policy(
        "other", 'types = ["cove"]\n[cove]\nmeasurements = ["' + "00" * 32 + '"]\nself_certified = true\n'
    )
    broker.admin.create_secret("app/db/password", "data", "other", value=b"x")
    broker.admin.create_secret("app/api/token", "data", "other", value=b"y")
    marker = tmp_path / "started"
    result = cove("run", "/bin/sh", "-c", f"echo started > {marker}", cwd=instance, env=platform_env)
    assert result.returncode != 0
    line = error_line(result)
    assert "PolicyDeny" in line and measurement(instance) in line
    assert "not started" in line
    assert not marker.exists()


def test_self_certified_platform_refused_by_default_policy(cove, tmp_path, platform_env):
    ca, cert, key = tls.make_local_tls(tmp_path / "tls")
    strict = EmbeddedBroker(
        Broker(Settings(db_url=f"sqlite:///{tmp_path / 'strict.db'}", master_key=os.urandom(32))), cert, key
    ).start()
    try:
        instance = make_instance(cove, tmp_path, extra=secrets_config(strict.url, ca))
        result = cove("run", "/bin/echo", "started", cwd=instance, env=platform_env)
        assert result.returncode != 0 and "started" not in result.stdout
        assert "self-certified" in error_line(result)
    finally:
        strict.stop()


def test_broker_unreachable(cove, tmp_path, broker, platform_env):
    url = broker.url
    instance = make_instance(cove, tmp_path, extra=secrets_config(url, broker.ca))
    broker.stop()
    result = cove("run", "/bin/echo", "started", cwd=instance, env=platform_env)
    assert result.returncode != 0 and "started" not in result.stdout
    assert "cannot reach the broker" in error_line(result)


def test_binary_secret_cannot_be_env(cove, tmp_path, broker, platform_env):
    instance = make_instance(cove, tmp_path, extra=secrets_config(broker.url, broker.ca))
    release_to(broker, instance)
    broker.admin.create_secret("app/db/password", "data", "app", value=b"fine")
    broker.admin.create_secret("app/api/token", "data", "app", value=b"\xff\xfe")
    result = cove("run", "/bin/echo", "started", cwd=instance, env=platform_env)
    assert result.returncode != 0 and "not UTF-8" in error_line(result)


def test_changed_broker_url_needs_rebuild(cove, tmp_path, broker, platform_env):
    """[attestation] is measured: pointing a built enclave at another broker is refused."""
    instance = make_instance(cove, tmp_path, extra=secrets_config(broker.url, broker.ca))
    config = instance / "cove.toml"
    config.write_text(config.read_text().replace(broker.url, "https://127.0.0.1:1"))
    result = cove("run", "/bin/echo", "started", cwd=instance, env=platform_env)
    assert result.returncode != 0 and "attestation.kbs" in error_line(result)


def test_debug_enclave_refused(cove, tmp_path, broker, platform_env):
    """A debug enclave's real Cove evidence says debug; the broker's policy refuses it."""
    instance = make_instance(
        cove, tmp_path, options={("enclave", "debug"): "true"}, extra=secrets_config(broker.url, broker.ca)
    )
    release_to(broker, instance)
    broker.admin.create_secret("app/db/password", "data", "app", value=b"x")
    broker.admin.create_secret("app/api/token", "data", "app", value=b"y")
    result = cove("run", "/bin/echo", "started", cwd=instance, env=platform_env)
    assert result.returncode != 0 and "started" not in result.stdout
    line = error_line(result)
    assert "AttestationDeny" in line and "debug enclave" in line


VOLUME = """
[[mounts]]
target = "/data"
type = "encrypted"
key = "kbs:app/volume/key"
"""


def test_kbs_volume_key(cove, tmp_path, broker, platform_env):
    """An encrypted mount keyed by the broker: data persists across runs, the host sees ciphertext,
    and an enclave the policy does not name cannot open the volume (it does not start)."""
    instance = make_instance(cove, tmp_path, extra=secrets_config(broker.url, broker.ca) + VOLUME)
    release_to(broker, instance)
    broker.admin.create_secret("app/db/password", "data", "app", value=b"pw")
    broker.admin.create_secret("app/api/token", "data", "app", value=b"tok")
    broker.admin.create_secret("app/volume/key", "aes-256", "app", exportable=False)
    cove.ok("run", "/bin/sh", "-c", "echo 'top secret ledger' > /data/ledger.txt", cwd=instance, env=platform_env)
    raw = b"".join(p.read_bytes() for p in (instance / "run").rglob("*") if p.is_file())
    assert raw and b"top secret ledger" not in raw
    again = cove.ok("run", "/bin/cat", "/data/ledger.txt", cwd=instance, env=platform_env)
    assert again.stdout == "top secret ledger\n"
    releases = [r["resource"] for r in broker.admin.audit(action="release") if r["outcome"] == "ok"]
    assert releases.count("app/volume/key@1") == 2
    # the same policy name now for another measurement: no key, no start
    broker.admin.put_policy(
        "app", 'types = ["cove"]\n[cove]\nmeasurements = ["' + "00" * 32 + '"]\nself_certified = true\n'
    )
    refused = cove("run", "/bin/cat", "/data/ledger.txt", cwd=instance, env=platform_env)
    assert refused.returncode != 0 and "top secret" not in refused.stdout
    assert "PolicyDeny" in error_line(refused)
