"""Provisioning a real `sim` enclave on a TPM-rooted platform (swtpm) from a broker that requires a TPM.

`cove run` asks the platform monitor for the enclave's evidence, whose
platform key is bound to the swtpm's quote; the broker (HTTPS on loopback)
trusts that swtpm's EK CA and AK CA and pins its EK certificate, so neither
a self-certified platform nor another TPM gets the secret.
"""

from __future__ import annotations

import os

import pytest
from joserfc import jwk

from cove.kbs import client as kbs_client
from cove.kbs import tls
from cove.kbs.broker import Broker, Settings
from cove.kbs.runner import EmbeddedBroker
from tests.conftest import error_line
from tests.e2e.helpers import make_instance
from tests.e2e.test_kbs_provisioning import measurement, secrets_config
from tests.kbs.test_tpm_rooted import tpm_policy
from tests.platform.conftest import TpmPlatforms


@pytest.fixture
def platforms(tmp_path):
    made = TpmPlatforms(tmp_path / "platforms")
    yield made
    made.stop_all()


@pytest.fixture
def tpm_broker(tmp_path, platforms):
    trusted = platforms.make("trusted")
    ca, cert, key = tls.make_local_tls(tmp_path / "tls")
    running = EmbeddedBroker(
        Broker(
            Settings(
                db_url=f"sqlite:///{tmp_path / 'kbs.db'}",
                master_key=os.urandom(32),
                attestation_policy=tpm_policy([trusted], pinned=trusted),
            )
        ),
        cert,
        key,
    ).start()
    admin_key = jwk.generate_key("EC", "P-256")
    running.broker.bootstrap_admin("root", admin_key.as_dict(private=False))
    running.admin = kbs_client.AdminClient(running.url, admin_key, "root", ca, running.broker.audience)
    running.ca, running.trusted = ca, trusted
    yield running
    running.admin.close()
    running.stop()


def test_tpm_rooted_enclave_gets_its_secrets(cove, tmp_path, tpm_broker, platforms):
    broker = tpm_broker
    instance = make_instance(cove, tmp_path, extra=secrets_config(broker.url, broker.ca))
    broker.admin.put_policy("app", f'types = ["cove"]\n[cove]\nmeasurements = ["{measurement(instance)}"]\n')
    broker.admin.create_secret("app/db/password", "data", "app", value=b"sealed by a TPM")
    broker.admin.create_secret("app/api/token", "data", "app", value=b"tok")
    env = {"COVE_PLATFORM_DIR": str(broker.trusted.dir)}
    result = cove.ok("run", "/bin/sh", "-c", 'cat /run/secrets/db; echo; echo "$API_TOKEN"', cwd=instance, env=env)
    assert result.stdout.splitlines() == ["sealed by a TPM", "tok"]
    attested = [r for r in broker.admin.audit(action="attest") if r["outcome"] == "ok"]
    assert attested and all(r["measurement"] == measurement(instance) for r in attested)

    # The same enclave on a self-certified platform, and on another swtpm: refused, not started.
    plain = tmp_path / "self-certified"
    plain.mkdir(mode=0o700)
    other = platforms.make("other")
    marker = tmp_path / "started"
    for folder, words in (
        (plain, ("AttestationDeny", "self-certified")),
        (other.dir, ("EvidenceInvalid", "EK certificate chain is not rooted in a trusted CA")),
    ):
        refused = cove(
            "run", "/bin/sh", "-c", f"echo started > {marker}", cwd=instance, env={"COVE_PLATFORM_DIR": str(folder)}
        )
        assert refused.returncode != 0 and not marker.exists()
        line = error_line(refused)
        assert all(word in line for word in words), line
