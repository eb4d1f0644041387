"""The KBS protocol over real HTTP(S) on loopback: whole flows and every denial.

Each test runs on SQLite and on a real PostgreSQL server.
"""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from cove.kbs import evidence_appraisal, jose
from cove.kbs.client import KbsClient, KbsError, SampleEvidence
from cove.kbs.problems import TYPE_PREFIX
from tests.kbs.conftest import MEASUREMENT, OTHER_MEASUREMENT, problem, release_policy, ssl_for, start_kbs, stop_kbs


def test_whole_flow_https_cookie_and_token(kbs):
    kbs.secret("app/db/password", b"hunter2")
    client = kbs.client()
    token = client.attest(kbs.sample())
    assert client.claims["tee"] == "sample"
    assert client.claims["tcb-status"]["measurement"] == MEASUREMENT
    assert client.claims["iss"] == kbs.broker.tokens.issuer
    assert client.resource("app/db/password") == b"hunter2"  # with the cookie
    assert client.resource("app/db/password", bearer=True) == b"hunter2"  # with the token alone
    assert token.count(".") == 2


def test_whole_flow_plain_http(db_url, tmp_path, tls_files):
    running = start_kbs(db_url, tmp_path, https=False)
    try:
        assert running.url.startswith("http://127.0.0.1:")
        running.secret("app/db/password", b"over-http")
        client = running.client()
        client.attest(running.sample())
        assert client.resource("app/db/password") == b"over-http"
    finally:
        stop_kbs(running)


@pytest.mark.parametrize("key_type", ["EC", "RSA"])
def test_jwe_algorithms(kbs, key_type):
    kbs.secret("app/key/k", b"\x00\x01binary\xff")
    client = kbs.client(key_type=key_type)
    client.attest(kbs.sample())
    document = client.resource_document("app/key/k")
    header = json.loads(base64.urlsafe_b64decode(document["protected"] + "=="))
    assert header["alg"] == {"EC": "ECDH-ES+A256KW", "RSA": "RSA-OAEP-256"}[key_type]
    assert header["enc"] == "A256GCM"
    assert set(document) == {"protected", "encrypted_key", "iv", "ciphertext", "tag"}
    assert client.open(document) == b"\x00\x01binary\xff"


def test_raw_protocol_messages(kbs):
    """The wire format: cookie, challenge, token, JWE, problem documents."""
    kbs.secret("app/x/y", b"raw")
    with httpx.Client(base_url=kbs.url, verify=ssl_for(kbs)) as http:
        reply = http.post("/kbs/v0/auth", json={"version": "0.1.0", "tee": "sample", "extra-params": ""})
        assert reply.status_code == 200, reply.text
        assert "kbs-session-id" in reply.cookies
        assert "HttpOnly" in reply.headers["set-cookie"] and "Secure" in reply.headers["set-cookie"]
        nonce = reply.json()["nonce"]
        assert len(base64.b64decode(nonce)) == 32
        key = jose.new_tee_key()
        runtime = {"nonce": nonce, "tee-pubkey": jose.public_jwk(key)}
        evidence = {
            "svn": 1,
            "debug": False,
            "measurement": MEASUREMENT,
            "report_data": base64.b64encode(evidence_appraisal.expected_report_data(runtime)).decode(),
        }
        # the composite tee-evidence form of newer clients is accepted too
        reply = http.post(
            "/kbs/v0/attest", json={"runtime-data": runtime, "tee-evidence": {"primary_evidence": evidence}}
        )
        assert reply.status_code == 200, reply.text
        reply = http.get("/kbs/v0/resource/app/x/y")
        assert reply.status_code == 200
        assert jose.decrypt_from(reply.json(), key) == b"raw"
        reply = http.get("/kbs/v0/resource/app/x/nothing")
        assert reply.status_code == 404
        assert reply.headers["content-type"].startswith("application/problem+json")
        body = reply.json()
        assert body["type"] == TYPE_PREFIX + "InvalidRequestPath" and body["status"] == 404 and body["detail"]


def test_sample_denied_by_default_policy(make_kbs):
    strict = make_kbs(policy=None)  # the broker's default attestation policy
    client = strict.client()
    with pytest.raises(KbsError) as caught:
        client.attest(strict.sample())
    assert problem(caught) == (401, "AttestationDeny")
    assert "evidence type sample is not accepted" in str(caught.value)


def test_wrong_measurement_denied(kbs):
    kbs.secret("app/db/password", b"hunter2", measurement=MEASUREMENT)
    client = kbs.client()
    client.attest(kbs.sample(OTHER_MEASUREMENT))
    with pytest.raises(KbsError) as caught:
        client.resource("app/db/password")
    assert problem(caught) == (401, "PolicyDeny")  # 401 on the protocol's paths, as Trustee answers
    assert OTHER_MEASUREMENT in str(caught.value)
    denied = kbs.admin.audit(action="release")
    assert denied[-1]["outcome"] == "denied" and denied[-1]["measurement"] == OTHER_MEASUREMENT


def test_debug_enclave_denied(kbs):
    client = kbs.client()
    with pytest.raises(KbsError) as caught:
        client.attest(kbs.sample(debug=True))
    assert problem(caught) == (401, "AttestationDeny")
    assert "debug" in str(caught.value)


def test_evidence_bound_to_another_tee_key(kbs):
    """Evidence made for key A, presented with key B: refused."""
    client = kbs.client()
    nonce = client.challenge("sample")
    key_a, key_b = jose.new_tee_key(), jose.new_tee_key()
    bound = evidence_appraisal.expected_report_data({"nonce": nonce, "tee-pubkey": jose.public_jwk(key_a)})
    evidence = SampleEvidence(claims={"svn": 1, "debug": False, "measurement": MEASUREMENT}).evidence(bound)
    reply = client.http.post(
        "/kbs/v0/attest",
        json={"runtime-data": {"nonce": nonce, "tee-pubkey": jose.public_jwk(key_b)}, "tee-evidence": evidence},
    )
    assert reply.status_code == 401
    assert reply.json()["type"] == TYPE_PREFIX + "EvidenceBinding"


def test_replayed_nonce(kbs):
    client = kbs.client()
    nonce = client.challenge("sample")
    key = jose.new_tee_key()
    runtime = {"nonce": nonce, "tee-pubkey": jose.public_jwk(key)}
    body = {
        "runtime-data": runtime,
        "tee-evidence": kbs.sample().evidence(evidence_appraisal.expected_report_data(runtime)),
    }
    first = client.http.post("/kbs/v0/attest", json=body)
    assert first.status_code == 200, first.text
    # the same attestation again, in the same session: the nonce is spent
    again = client.http.post("/kbs/v0/attest", json=body)
    assert again.status_code == 401 and again.json()["type"] == TYPE_PREFIX + "NonceReplayed"
    # the old attestation in a fresh session: it carries the old nonce
    client.challenge("sample")
    replay = client.http.post("/kbs/v0/attest", json=body)
    assert replay.status_code == 401 and replay.json()["type"] == TYPE_PREFIX + "NonceMismatch"


def test_expired_session(kbs):
    kbs.secret("app/db/password")
    client = kbs.client()
    client.attest(kbs.sample())
    kbs.clock.advance(kbs.broker.settings.session_lifetime + 1)
    with pytest.raises(KbsError) as caught:
        client.resource("app/db/password")
    assert problem(caught) == (401, "SessionExpired")
    # a challenge not answered in time
    client.challenge("sample")
    kbs.clock.advance(kbs.broker.settings.challenge_lifetime + 1)
    reply = client.http.post(
        "/kbs/v0/attest",
        json={"runtime-data": {"nonce": "x", "tee-pubkey": jose.public_jwk(jose.new_tee_key())}, "tee-evidence": {}},
    )
    assert reply.status_code == 401 and reply.json()["type"] == TYPE_PREFIX + "SessionExpired"


def test_expired_token(kbs):
    kbs.secret("app/db/password")
    client = kbs.client()
    client.attest(kbs.sample())
    kbs.clock.advance(kbs.broker.settings.token_lifetime + 1)
    with pytest.raises(KbsError) as caught:
        client.resource("app/db/password", bearer=True)
    assert problem(caught) == (401, "TokenVerifierError")


def test_token_from_another_broker(kbs, make_kbs):
    kbs.secret("app/db/password")
    other = make_kbs()
    stranger = other.client()
    stranger.attest(other.sample())
    client = kbs.client()
    client.tee_key, client.token = stranger.tee_key, stranger.token
    with pytest.raises(KbsError) as caught:
        client.resource("app/db/password", bearer=True)
    assert problem(caught) == (401, "TokenVerifierError")


def test_tampered_token_refused(kbs):
    kbs.secret("app/db/password")
    client = kbs.client()
    client.attest(kbs.sample(OTHER_MEASUREMENT))
    header, body, signature = client.token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["tcb-status"]["measurement"] = MEASUREMENT  # promote ourselves
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    client.token = f"{header}.{forged}.{signature}"
    with pytest.raises(KbsError) as caught:
        client.resource("app/db/password", bearer=True)
    assert problem(caught) == (401, "TokenVerifierError")


@pytest.mark.parametrize("member", ["ciphertext", "tag", "encrypted_key", "iv", "protected"])
def test_tampered_jwe_refused_by_client(kbs, member):
    kbs.secret("app/db/password", b"hunter2")
    client = kbs.client()
    client.attest(kbs.sample())
    document = client.resource_document("app/db/password")
    raw = bytearray(base64.urlsafe_b64decode(document[member] + "=" * (-len(document[member]) % 4)))
    raw[len(raw) // 2] ^= 0x01
    document[member] = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(KbsError) as caught:
        client.open(document)
    assert "does not decrypt" in str(caught.value)


def test_jwe_for_another_tee_is_useless(kbs):
    kbs.secret("app/db/password", b"hunter2")
    alice, mallory = kbs.client(), kbs.client()
    alice.attest(kbs.sample())
    mallory.attest(kbs.sample())
    with pytest.raises(KbsError):
        mallory.open(alice.resource_document("app/db/password"))


def test_unknown_resource_404(kbs):
    client = kbs.client()
    client.attest(kbs.sample())
    with pytest.raises(KbsError) as caught:
        client.resource("app/db/none")
    assert problem(caught) == (404, "InvalidRequestPath")


def test_resource_needs_attestation(kbs):
    kbs.secret("app/db/password")
    client = kbs.client()
    with pytest.raises(KbsError) as caught:
        client.resource_document("app/db/password")
    assert problem(caught) == (401, "TokenNotFound")
    client.challenge("sample")  # a session that has not attested
    with pytest.raises(KbsError) as caught:
        client.resource_document("app/db/password")
    assert problem(caught) == (401, "AttestationError")
    client.http.cookies.clear()
    client.http.cookies.set("kbs-session-id", "forged", domain="127.0.0.1", path="/kbs")
    reply = client.http.get("/kbs/v0/resource/app/db/password")
    assert reply.status_code == 401 and reply.json()["type"] == TYPE_PREFIX + "SessionNotFound"


@pytest.mark.parametrize(
    "body, kind",
    [
        ({"version": "9.0.0", "tee": "sample"}, "ProtocolVersion"),
        ({"version": "0.1.1", "tee": "vax"}, "UnknownTee"),
        ({"version": "0.1.1"}, "InvalidRequest"),
        ([], "InvalidRequest"),
    ],
)
def test_bad_auth_requests(kbs, body, kind):
    with httpx.Client(base_url=kbs.url, verify=ssl_for(kbs)) as http:
        reply = http.post("/kbs/v0/auth", json=body)
    assert reply.status_code == 401  # what Trustee answers; a CoCo client retries on nothing else
    assert reply.json()["type"] == TYPE_PREFIX + kind and reply.json()["status"] == 401


@pytest.mark.parametrize(
    "pubkey, words",
    [
        ({"kty": "RSA", "alg": "RSA1_5", "n": "AQAB", "e": "AQAB"}, "not supported"),
        ({"kty": "oct", "k": "AAAA"}, "not EC or RSA"),
        ({"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA"}, "not P-256, P-384 or P-521"),
        ({"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}, "not a valid public key"),
    ],
)
def test_bad_tee_keys(kbs, pubkey, words):
    client = kbs.client()
    nonce = client.challenge("sample")
    reply = client.http.post(
        "/kbs/v0/attest", json={"runtime-data": {"nonce": nonce, "tee-pubkey": pubkey}, "tee-evidence": {}}
    )
    assert reply.status_code == 401 and words in reply.json()["detail"]


def test_versions_and_rotation(kbs):
    kbs.secret("app/db/password", b"v1")
    kbs.admin.rotate_secret("app/db/password", b"v2")
    client = kbs.client()
    client.attest(kbs.sample())
    assert client.resource("app/db/password") == b"v2"
    assert client.resource("app/db/password", version=1) == b"v1"
    with pytest.raises(KbsError) as caught:
        client.resource("app/db/password", version=7)
    assert problem(caught) == (404, "InvalidRequestPath")


def test_generated_kinds_released(kbs):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    name = "gen"
    kbs.admin.put_policy(name, release_policy())
    for kind in ("aes-256", "ec-p256", "ec-p384", "rsa-2048", "password", "cert"):
        kbs.admin.create_secret(f"gen/{kind}/one", kind, name, exportable=False)
    client = kbs.client()
    client.attest(kbs.sample(signer="ee" * 32, name="demo"))
    assert len(client.resource("gen/aes-256/one")) == 32
    for kind in ("ec-p256", "ec-p384", "rsa-2048"):
        key = serialization.load_pem_private_key(client.resource(f"gen/{kind}/one"), None)
        public = kbs.admin.secret(f"gen/{kind}/one")["public"]["public_key_pem"]
        assert (
            key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
            == public
        )
    assert len(client.resource("gen/password/one")) == 32
    bundle = client.resource("gen/cert/one")
    certs = x509.load_pem_x509_certificates(bundle)
    leaf, ca = certs[0], certs[1]
    assert ca.subject == leaf.issuer
    ca.public_key().verify(
        leaf.signature,
        leaf.tbs_certificate_bytes,
        __import__("cryptography.hazmat.primitives.asymmetric.ec", fromlist=["ECDSA"]).ECDSA(
            leaf.signature_hash_algorithm
        ),
    )
    from cove.kbs.secrets import OID_MEASUREMENT

    assert leaf.extensions.get_extension_for_oid(OID_MEASUREMENT).value.value == bytes.fromhex(MEASUREMENT)
    served_ca = httpx.get(kbs.url + "/kbs/v0/ca", verify=ssl_for(kbs)).text
    assert served_ca.encode() == ca.public_bytes(serialization.Encoding.PEM)


def test_jwks_verifies_tokens(kbs):
    from joserfc import jwk, jwt

    client = kbs.client()
    client.attest(kbs.sample())
    keys = httpx.get(kbs.url + "/kbs/v0/jwks", verify=ssl_for(kbs)).json()["keys"]
    key = jwk.import_key(keys[0], "EC")
    assert jwt.decode(client.token, key, algorithms=["ES256"]).claims["tee"] == "sample"


def test_client_refuses_untrusted_tls(kbs):
    with pytest.raises(KbsError) as caught:
        KbsClient(kbs.url).challenge("sample")  # the system CAs do not know the broker
    assert "cannot reach" in str(caught.value)
