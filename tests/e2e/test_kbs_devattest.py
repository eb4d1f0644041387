"""cove.kbs.client with evidence from a real /dev/attestation (the runtime's FUSE service).

The client writes report data to user_report_data and reads quote, exactly as
a program inside an enclave does; the broker verifies the Cove evidence and
releases by measurement.
"""

from __future__ import annotations

import os

import pytest

from cove.config import parse
from cove.kbs import tls
from cove.kbs.broker import Broker, Settings
from cove.kbs.client import DevAttestation, KbsClient, KbsError
from cove.kbs.runner import EmbeddedBroker
from cove.runtime.backend import EnclaveIdentity
from cove.runtime.enclave_services import ServiceContext
from tests.conftest import require

MEASUREMENT = bytes.fromhex("5a" * 32)


@pytest.fixture
def devattest(tmp_path, monkeypatch):
    require("fusermount3")
    from cove.runtime.attestation_service import AttestationService

    monkeypatch.setenv("COVE_PLATFORM_DIR", str(tmp_path / "platform"))
    (tmp_path / "platform").mkdir(mode=0o700)
    (tmp_path / "work").mkdir()
    identity = EnclaveIdentity("app", MEASUREMENT, bytes(32), 1, 2, False)
    ctx = ServiceContext(
        identity,
        parse('[enclave]\nname = "app"\n'),
        "0123456789abcdef",
        "sim",
        "namespaces+seccomp",
        tmp_path / "state",
        tmp_path / "work",
    )
    service = AttestationService()
    binds = service.start(ctx)
    yield binds[0].host
    service.stop()


def test_client_with_dev_attestation(devattest, tmp_path):
    ca, cert, key = tls.make_local_tls(tmp_path / "tls")
    broker = Broker(
        Settings(
            db_url=f"sqlite:///{tmp_path / 'kbs.db'}",
            master_key=os.urandom(32),
            attestation_policy='types = ["cove"]\n[cove]\nself_certified = true\n',
        )
    )
    broker.put_policy(
        "t", "ours", f'types = ["cove"]\n[cove]\nmeasurements = ["{MEASUREMENT.hex()}"]\nself_certified = true\n'
    )
    broker.put_policy(
        "t", "theirs", 'types = ["cove"]\n[cove]\nmeasurements = ["' + "00" * 32 + '"]\nself_certified = true\n'
    )
    broker.create_secret("t", "app/db/password", "data", "ours", True, {}, b"from-the-broker")
    broker.create_secret("t", "other/db/password", "data", "theirs", True, {}, b"not-for-us")
    with EmbeddedBroker(broker, cert, key) as server:
        with KbsClient(server.url, ca) as client:
            client.attest(DevAttestation(devattest))
            claims = client.claims["tcb-status"]
            assert claims["measurement"] == MEASUREMENT.hex()
            assert claims["backend"] == "sim" and claims["platform_root"] == "self-certified"
            assert claims["svn"] == 2 and claims["instance_id"] == "0123456789abcdef"
            assert client.resource("app/db/password") == b"from-the-broker"
            with pytest.raises(KbsError) as caught:
                client.resource("other/db/password")
            assert caught.value.kind == "PolicyDeny"
