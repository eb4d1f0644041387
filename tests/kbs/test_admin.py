"""The admin API over HTTPS: keys and roles, secrets, policies, export rules, the audit log."""

from __future__ import annotations

import base64
import time

import httpx
import pytest
from joserfc import jwk

from cove.kbs import jose
from cove.kbs.client import AdminClient, KbsError
from cove.kbs.problems import TYPE_PREFIX
from tests.kbs.conftest import MEASUREMENT, problem, release_policy, ssl_for


def test_admin_without_key_401(kbs):
    with httpx.Client(base_url=kbs.url, verify=ssl_for(kbs)) as http:
        for method, path in (
            ("GET", "/kbs/v0/admin/secrets"),
            ("GET", "/kbs/v0/admin/audit"),
            ("PUT", "/kbs/v0/admin/policies/p"),
            ("POST", "/kbs/v0/admin/keys"),
        ):
            reply = http.request(method, path, json={"body": "", "name": "x", "jwk": {}})
            if reply.status_code == 400:  # body checked before auth: send a valid one
                continue
            assert reply.status_code == 401, (path, reply.text)
            assert reply.json()["type"] == TYPE_PREFIX + "AdminAuth"
        reply = http.get("/kbs/v0/admin/secrets", headers={"Authorization": "Bearer not-a-jwt"})
        assert reply.status_code == 401 and reply.json()["type"] == TYPE_PREFIX + "AdminAuth"


def test_unregistered_and_forged_keys_401(kbs):
    stranger = AdminClient(kbs.url, jwk.generate_key("EC", "P-256"), "root", kbs.ca, kbs.broker.audience)
    try:
        with pytest.raises(KbsError) as caught:
            stranger.secrets()  # claims to be "root", signed with another key
        assert problem(caught) == (401, "AdminAuth")
        stranger.key_name = "nobody"
        with pytest.raises(KbsError) as caught:
            stranger.secrets()
        assert problem(caught) == (401, "AdminAuth")
    finally:
        stranger.close()


def test_expired_and_foreign_admin_tokens_401(kbs, make_kbs):
    token = jose.make_admin_token(kbs.admin.key, "root", kbs.broker.audience, lifetime=60, now=time.time() - 3600)
    with httpx.Client(base_url=kbs.url, verify=ssl_for(kbs)) as http:
        reply = http.get("/kbs/v0/admin/secrets", headers={"Authorization": f"Bearer {token}"})
        assert reply.status_code == 401 and "expired" in reply.json()["detail"]
        other = make_kbs()
        foreign = jose.make_admin_token(kbs.admin.key, "root", other.broker.audience)
        reply = http.get("/kbs/v0/admin/secrets", headers={"Authorization": f"Bearer {foreign}"})
        assert reply.status_code == 401 and "another broker" in reply.json()["detail"]


def test_non_admin_key_403(kbs):
    auditor_key = jwk.generate_key("EC", "P-256")
    kbs.admin.add_key("alice", auditor_key.as_dict(private=False), "auditor")
    auditor = AdminClient(kbs.url, auditor_key, "alice", kbs.ca, kbs.broker.audience)
    try:
        kbs.secret("app/db/password", b"hunter2")
        assert [s["path"] for s in auditor.secrets()] == ["app/db/password"]  # reading metadata is allowed
        assert auditor.audit()
        for call in (
            lambda: auditor.put_policy("x", release_policy()),
            lambda: auditor.create_secret("a/b/c", "aes-256", "x"),
            lambda: auditor.rotate_secret("app/db/password", b"new"),
            lambda: auditor.delete_secret("app/db/password"),
            lambda: auditor.export("app/db/password"),
            lambda: auditor.add_key("bob", auditor_key.as_dict(private=False), "admin"),
        ):
            with pytest.raises(KbsError) as caught:
                call()
            assert problem(caught) == (403, "AdminForbidden")
        forbidden = [r for r in kbs.admin.audit() if r["outcome"] == "forbidden"]
        assert len(forbidden) == 6 and all(r["actor"] == "admin:alice" for r in forbidden)
    finally:
        auditor.close()


def test_never_export_secret_unreadable_by_admin(kbs):
    kbs.admin.put_policy("p", release_policy())
    created = kbs.admin.create_secret("vol/key/data", "aes-256", "p", exportable=False)
    assert created["exportable"] is False and "value" not in created
    with pytest.raises(KbsError) as caught:
        kbs.admin.export("vol/key/data")
    assert problem(caught) == (403, "NotExportable")
    # ... and no other admin endpoint shows it either
    shown = kbs.admin.secret("vol/key/data")
    assert set(shown) == {
        "path",
        "kind",
        "params",
        "policy",
        "exportable",
        "version",
        "public",
        "versions",
        "created_at",
        "updated_at",
    }
    # an attested enclave does receive it
    client = kbs.client()
    client.attest(kbs.sample())
    assert len(client.resource("vol/key/data")) == 32
    refused = kbs.admin.audit(action="secret.export")
    assert refused[-1]["outcome"] == "refused"


def test_never_export_key_pair_shows_only_public_half(kbs):
    kbs.admin.put_policy("p", release_policy())
    created = kbs.admin.create_secret("tls/key/server", "ec-p384", "p", exportable=False)
    assert "BEGIN PUBLIC KEY" in created["public"]["public_key_pem"]
    assert "PRIVATE" not in str(created)


def test_upload_export_rotate_delete(kbs):
    kbs.admin.put_policy("p", release_policy())
    kbs.admin.create_secret("app/cfg/one", "data", "p", value=b"first")
    assert kbs.admin.export("app/cfg/one") == b"first"
    rotated = kbs.admin.rotate_secret("app/cfg/one", b"second")
    assert rotated["version"] == 2 and [v["version"] for v in rotated["versions"]] == [1, 2]
    assert kbs.admin.export("app/cfg/one") == b"second"
    assert kbs.admin.export("app/cfg/one", version=1) == b"first"
    with pytest.raises(KbsError) as caught:
        kbs.admin.create_secret("app/cfg/one", "data", "p", value=b"again")
    assert problem(caught) == (409, "Conflict")
    with pytest.raises(KbsError) as caught:
        kbs.admin.delete_policy("p")  # in use
    assert problem(caught) == (409, "Conflict")
    kbs.admin.delete_secret("app/cfg/one")
    with pytest.raises(KbsError) as caught:
        kbs.admin.secret("app/cfg/one")
    assert problem(caught) == (404, "NotFound")
    kbs.admin.delete_policy("p")
    assert kbs.admin.policies() == []


def test_generated_rotation_changes_value(kbs):
    kbs.admin.put_policy("p", release_policy())
    kbs.admin.create_secret("app/key/k", "aes-256", "p")
    first = kbs.admin.export("app/key/k")
    kbs.admin.rotate_secret("app/key/k")
    assert kbs.admin.export("app/key/k") != first and kbs.admin.export("app/key/k", version=1) == first


def test_change_release_policy(kbs):
    kbs.secret("app/db/password", b"pw", measurement="ee" * 32)
    client = kbs.client()
    client.attest(kbs.sample())
    with pytest.raises(KbsError):
        client.resource("app/db/password")
    kbs.admin.put_policy("ours", release_policy(MEASUREMENT))
    kbs.admin.set_secret_policy("app/db/password", "ours")
    assert client.resource("app/db/password") == b"pw"


@pytest.mark.parametrize(
    "body, words",
    [
        ({"path": "a/b", "kind": "data", "policy": "p", "value": "eA=="}, "repository/type/tag"),
        ({"path": "a/b/c", "kind": "plutonium", "policy": "p"}, "not one of"),
        ({"path": "a/b/c", "kind": "aes-256", "policy": "p", "value": "eA=="}, "exactly 32 bytes"),
        ({"path": "a/b/c", "kind": "password", "policy": "p", "params": {"length": 3}}, "12..256"),
        ({"path": "a/b/c", "kind": "data", "policy": "p"}, "not generated"),
        ({"path": "a/b/c", "kind": "data", "policy": "nope", "value": "eA=="}, "no policy"),
        ({"path": "a/b/c", "kind": "data", "policy": "p", "value": "%%%"}, "base64"),
    ],
)
def test_bad_secret_requests(kbs, body, words):
    kbs.admin.put_policy("p", release_policy())
    with pytest.raises(KbsError) as caught:
        kbs.admin.request("POST", "/kbs/v0/admin/secrets", body)
    assert 400 <= caught.value.status < 500 and words in str(caught.value)


def test_bad_policy_refused(kbs):
    with pytest.raises(KbsError) as caught:
        kbs.admin.put_policy("p", "[cove]\nmeasurements = 3\n")
    assert problem(caught) == (422, "PolicyInvalid")
    assert "cove.measurements" in str(caught.value)


def test_uploaded_policy_names_no_host_files(kbs):
    """A release policy naming a certificate file would make the broker read its own files: refused."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "data" / "vectors" / "intel_sgx_root_ca.pem"
    with pytest.raises(KbsError) as caught:
        kbs.admin.put_policy("p", f'types = ["sgx"]\n[sgx]\nroots = ["{root}"]\n')
    assert problem(caught) == (422, "PolicyInvalid")
    assert "must carry its certificates inline" in str(caught.value)
    inline = json.dumps(root.read_text())
    assert kbs.admin.put_policy("p", f'types = ["sgx"]\n[sgx]\nroots = [{inline}]\n')


def test_audit_records_who_what_measurement_when(kbs):
    started = time.time() - 1
    kbs.secret("app/db/password", b"pw")
    client = kbs.client()
    client.attest(kbs.sample())
    client.resource("app/db/password")
    log = kbs.admin.audit()
    actions = [r["action"] for r in log]
    assert actions[:3] == ["key.add", "policy.put", "secret.create"]
    release = [r for r in log if r["action"] == "release"][-1]
    assert release["outcome"] == "ok" and release["measurement"] == MEASUREMENT
    assert release["resource"] == "app/db/password@1" and release["actor"].startswith("sample:")
    assert release["at"] >= started
    assert all(r["actor"] for r in log)
    session = client.http.cookies.get("kbs-session-id")
    assert session and session[:8] not in str(log)  # the cookie is a credential: never logged
    later = kbs.admin.audit(after=log[-2]["id"])
    assert [r["id"] for r in later] == [log[-1]["id"]]


def test_admin_key_management(kbs):
    key = jwk.generate_key("OKP", "Ed25519")
    kbs.admin.add_key("ed", key.as_dict(private=False), "admin")
    ed = AdminClient(kbs.url, key, "ed", kbs.ca, kbs.broker.audience)
    try:
        assert {k["name"] for k in ed.keys()} == {"root", "ed"}
        with pytest.raises(KbsError) as caught:
            kbs.admin.add_key("bad", key.as_dict(private=True), "admin")
        assert problem(caught)[0] == 400
        kbs.admin.delete_key("ed")
        with pytest.raises(KbsError) as caught:
            ed.keys()
        assert problem(caught) == (401, "AdminAuth")
    finally:
        ed.close()


def test_admin_token_alg_none_refused(kbs):
    header = base64.urlsafe_b64encode(b'{"alg":"none","kid":"root"}').rstrip(b"=").decode()
    body = (
        base64.urlsafe_b64encode(
            f'{{"aud":"{kbs.broker.audience}","iat":{int(time.time())},"exp":{int(time.time()) + 60}}}'.encode()
        )
        .rstrip(b"=")
        .decode()
    )
    with httpx.Client(base_url=kbs.url, verify=ssl_for(kbs)) as http:
        reply = http.get("/kbs/v0/admin/secrets", headers={"Authorization": f"Bearer {header}.{body}."})
    assert reply.status_code == 401


@pytest.mark.parametrize(
    "public",
    [
        {},
        {"kty": 5},
        {"kty": "EC"},
        {"kty": "EC", "crv": "P-999", "x": "AA", "y": "AA"},
        {"kty": "EC", "crv": ["P-256"], "x": "AA", "y": "AA"},
        {"kty": "EC", "crv": "P-256", "x": "A" * 43, "y": "A" * 43},  # not a point on the curve
        {"kty": "OKP", "crv": "Ed25519", "x": "!!"},
        {"kty": "OKP", "crv": "Ed25519", "x": 123},
        {"kty": "OKP", "crv": "X25519", "x": "A" * 43},
        {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
        {"kty": "oct", "k": "AAAA"},
        "a string",
    ],
)
def test_hostile_admin_keys_are_one_invalid_request(tmp_path, public):
    """Every malformed or unusable JWK is an InvalidRequest problem, never another exception."""
    from cove.kbs.broker import Broker, Settings
    from cove.kbs.problems import Problem

    broker = Broker(Settings(db_url=f"sqlite:///{tmp_path}/kbs.db", master_key=b"k" * 32))
    with pytest.raises(Problem) as raised:
        broker.bootstrap_admin("hostile", public)
    assert raised.value.kind == "InvalidRequest", raised.value


def test_an_ec_key_on_another_curve_is_refused(tmp_path):
    """A P-521 key imports, but admins sign only with Ed25519, ES256 or ES384: refused when added."""
    from cove.kbs.broker import Broker, Settings
    from cove.kbs.problems import Problem

    broker = Broker(Settings(db_url=f"sqlite:///{tmp_path}/kbs.db", master_key=b"k" * 32))
    with pytest.raises(Problem, match="another curve"):
        broker.bootstrap_admin("p521", jwk.generate_key("EC", "P-521").as_dict(private=False))
    assert broker.bootstrap_admin("p384", jwk.generate_key("EC", "P-384").as_dict(private=False))
