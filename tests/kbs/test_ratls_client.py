"""Clients that require an RA-TLS broker refuse one that offers a plain (CA-issued) certificate.

The broker is real (HTTPS on loopback with the local CA's certificate); the
client is given a broker policy instead of the CA, so the handshake's
certificate must carry evidence the policy accepts, and this one carries none.
"""

from __future__ import annotations

import pytest

from cove.kbs.client import AdminClient, KbsClient, KbsError
from tests.conftest import error_line

POLICY = 'types = ["cove"]\n[cove]\nmeasurements = ["' + "ab" * 32 + '"]\n'


def test_plain_certificate_refused_where_a_policy_is_required(make_kbs, tmp_path):
    kbs = make_kbs()
    kbs.secret("app/db/password", b"never sent")
    policy_file = tmp_path / "broker.toml"
    policy_file.write_text(POLICY)
    for policy in (POLICY, policy_file, str(policy_file)):
        with KbsClient(kbs.url, broker_policy=policy) as client:
            with pytest.raises(KbsError) as caught:
                client.attest(kbs.sample())
        assert caught.value.kind == "RaTlsRejected" and caught.value.status is None
        assert "failed RA-TLS verification" in str(caught.value)
        assert "no tagged-evidence extension" in str(caught.value)
    admin = AdminClient(kbs.url, kbs.admin.key, "root", audience=kbs.broker.audience, broker_policy=POLICY)
    with pytest.raises(KbsError, match="failed RA-TLS verification"):
        admin.secrets()
    admin.close()
    # The same broker, trusted by its CA, works: the refusal was the policy's.
    client = kbs.client()
    client.attest(kbs.sample())
    assert client.resource("app/db/password") == b"never sent"
    audit = kbs.admin.audit()
    assert sum(1 for r in audit if r["action"] == "attest") == 1  # the refused clients sent nothing


def test_ca_and_policy_exclude_each_other(make_kbs):
    kbs = make_kbs()
    with pytest.raises(KbsError, match="not both"):
        KbsClient(kbs.url, kbs.ca, broker_policy=POLICY)
    with pytest.raises(KbsError, match="broker policy: .*measurements"):
        KbsClient(kbs.url, broker_policy='[cove]\nmeasurements = ["zz"]\n')


def test_cli_get_refuses_a_plain_certificate(cove, make_kbs, tmp_path):
    kbs = make_kbs()
    policy = tmp_path / "broker.toml"
    policy.write_text(POLICY)
    result = cove("kbs", "get", kbs.url, "app/db/password", "--tee", "sample", "--kbs-policy", policy)
    assert result.returncode == 6 and not result.stdout
    line = error_line(result)
    assert "failed RA-TLS verification" in line and "no tagged-evidence extension" in line
