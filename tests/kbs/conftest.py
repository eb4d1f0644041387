"""Key broker fixtures: a real database (SQLite, and a throwaway PostgreSQL server),
a broker served over real HTTP or HTTPS on loopback, an admin client, KBS clients.

Every test that takes ``kbs`` runs twice: once on SQLite, once on PostgreSQL.
A missing PostgreSQL is a failure naming scripts/setup, never a skip.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from joserfc import jwk

from cove.kbs import client as kbs_client
from cove.kbs import tls
from cove.kbs.broker import Broker, Settings
from cove.kbs.runner import EmbeddedBroker
from tests.kbs.pgserver import PgMissing, PgServer

# Accepts sample evidence (not debug): the protocol tests' attestation policy.
SAMPLE_ATTESTATION_POLICY = 'types = ["sample"]\n'
MEASUREMENT = "ab" * 32
OTHER_MEASUREMENT = "cd" * 32


def release_policy(measurement: str = MEASUREMENT, tee: str = "sample") -> str:
    return f'types = ["{tee}"]\n[{tee}]\nmeasurements = ["{measurement}"]\n'


@pytest.fixture(scope="session")
def pg():
    try:
        server = PgServer().start()
    except PgMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


def database(kind: str, request, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'kbs.db'}"
    server = request.getfixturevalue("pg")
    return server.create_database("kbs_" + uuid.uuid4().hex[:16])


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    return database(request.param, request, tmp_path)


class Clock:
    """Broker time that tests can move forward."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self) -> float:
        import time

        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    return tls.make_local_tls(tmp_path_factory.mktemp("tls"))


@dataclass
class Kbs:
    """A running broker, its admin client, and a way to make KBS clients."""

    broker: Broker
    server: EmbeddedBroker
    url: str
    ca: Path | None
    clock: Clock
    admin: kbs_client.AdminClient
    clients: list = field(default_factory=list)

    def client(self, **kwargs) -> kbs_client.KbsClient:
        made = kbs_client.KbsClient(self.url, self.ca, **kwargs)
        self.clients.append(made)
        return made

    def sample(self, measurement: str = MEASUREMENT, **claims) -> kbs_client.SampleEvidence:
        return kbs_client.SampleEvidence(claims={"svn": 1, "debug": False, "measurement": measurement, **claims})

    def secret(self, path: str, value: bytes = b"s3cret", measurement: str = MEASUREMENT, **kwargs) -> None:
        name = "p-" + uuid.uuid4().hex[:8]
        self.admin.put_policy(name, release_policy(measurement))
        self.admin.create_secret(
            path,
            kwargs.pop("kind", "data"),
            name,
            value=None if kwargs.get("generate") else value,
            **{k: v for k, v in kwargs.items() if k != "generate"},
        )


def start_kbs(
    db: str,
    tmp_path: Path,
    https: bool,
    tls_files=None,
    policy: str | None = SAMPLE_ATTESTATION_POLICY,
    master_key: bytes | None = None,
    **settings,
) -> Kbs:
    clock = settings.pop("clock", None) or Clock()
    master_key = master_key or os.urandom(32)
    broker = Broker(Settings(db_url=db, master_key=master_key, attestation_policy=policy, clock=clock, **settings))
    ca = cert = key = None
    if https:
        ca, cert, key = tls_files
    server = EmbeddedBroker(broker, cert, key).start()
    admin_key = jwk.generate_key("EC", "P-256")
    broker.bootstrap_admin("root", admin_key.as_dict(private=False))
    admin = kbs_client.AdminClient(server.url, admin_key, "root", ca, broker.audience)
    return Kbs(broker, server, server.url, ca, clock, admin)


def stop_kbs(kbs: Kbs) -> None:
    for made in kbs.clients:
        made.close()
    kbs.admin.close()
    kbs.server.stop()


@pytest.fixture(params=["https", "http"])
def transport(request) -> str:
    return request.param


@pytest.fixture
def kbs(db_url, tmp_path, tls_files):
    """A broker over HTTPS on loopback (SQLite and PostgreSQL)."""
    running = start_kbs(db_url, tmp_path, True, tls_files)
    yield running
    stop_kbs(running)


@pytest.fixture
def make_kbs(tmp_path, tls_files, request):
    """Start more brokers (other settings, other databases); all stopped at the end."""
    started: list[Kbs] = []

    def make(db: str | None = None, https: bool = True, **settings) -> Kbs:
        running = start_kbs(
            db or f"sqlite:///{tmp_path / (uuid.uuid4().hex + '.db')}", tmp_path, https, tls_files, **settings
        )
        started.append(running)
        return running

    yield make
    for running in started:
        stop_kbs(running)


def problem(exc_info) -> tuple[int | None, str | None]:
    """(status, kind) of a refused request."""
    return exc_info.value.status, exc_info.value.kind


def ssl_for(kbs: Kbs):
    """An SSL context trusting the broker's local CA (for raw httpx requests)."""
    import ssl

    return ssl.create_default_context(cafile=str(kbs.ca))
