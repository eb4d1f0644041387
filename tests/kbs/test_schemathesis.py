"""schemathesis against the broker's own OpenAPI document, over real HTTP: no 5xx, bounded.

Admin operations are called with a valid admin token, so generated bodies
reach the admin logic rather than stopping at authentication; protocol
operations are called as a stranger would.
"""

from __future__ import annotations

import os

import pytest

try:
    import schemathesis
except ImportError:  # a missing test dependency is a failure naming the fix, never a skip
    pytest.fail("schemathesis is not installed: run scripts/setup (it installs the [test] extra)", pytrace=False)
from hypothesis import HealthCheck, given, settings
from joserfc import jwk

from cove.kbs import jose
from cove.kbs.broker import Broker, Settings
from cove.kbs.runner import EmbeddedBroker
from tests.kbs.conftest import SAMPLE_ATTESTATION_POLICY

_STATE: dict = {}


@pytest.fixture(scope="module")
def kbs_schema(tmp_path_factory):
    folder = tmp_path_factory.mktemp("schemathesis")
    broker = Broker(
        Settings(
            db_url=f"sqlite:///{folder / 'kbs.db'}",
            master_key=os.urandom(32),
            attestation_policy=SAMPLE_ATTESTATION_POLICY,
        )
    )
    key = jwk.generate_key("EC", "P-256")
    broker.bootstrap_admin("root", key.as_dict(private=False))
    broker.put_policy("root", "p", 'types = ["sample"]\n')
    broker.create_secret("root", "a/b/c", "data", "p", True, {}, b"value")
    server = EmbeddedBroker(broker).start()
    _STATE.update(key=key, audience=broker.audience)
    yield schemathesis.openapi.from_url(server.url + "/openapi.json")
    server.stop()


def check(case) -> None:
    headers = {}
    if case.path.startswith("/kbs/v0/admin"):
        headers["Authorization"] = "Bearer " + jose.make_admin_token(_STATE["key"], "root", _STATE["audience"])
    response = case.call(headers=headers, timeout=30)
    _STATE["calls"] = _STATE.get("calls", 0) + 1
    _STATE.setdefault("statuses", set()).add(response.status_code)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
    if response.status_code >= 400:
        content_type = response.headers.get("content-type")
        content_type = content_type[0] if isinstance(content_type, list) else content_type
        assert content_type.startswith("application/problem+json"), response.text[:200]
        body = response.json()
        assert body["status"] == response.status_code and body["type"].startswith("urn:cove:kbs:error:")


def test_no_server_errors(kbs_schema):
    """Every operation of the OpenAPI document, 30 generated cases each (derandomized: reproducible)."""
    operations = [result.ok() for result in kbs_schema.get_all_operations()]
    assert len(operations) >= 20, [op.label for op in operations]
    for operation in operations:

        @settings(
            max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
        )
        @given(case=operation.as_strategy())
        def run(case):
            check(case)

        run()
    assert _STATE["calls"] >= 10 * len(operations), _STATE["calls"]
    assert {200, 204, 400, 404} <= _STATE["statuses"], _STATE["statuses"]  # it got past validation, too
