"""EAR attestation tokens: issued from real appraisals, checked against the verifier's JWKS."""

from __future__ import annotations

import base64
import json
import stat
import time

import pytest

from cove.attest import ear
from cove.attest.appraisal import Appraisal
from cove.attest.policy import default_policy, evaluate, parse_policy

APPRAISAL = Appraisal(
    evidence_type="cove",
    measurement=b"\x01" * 32,
    signer=b"\x02" * 32,
    product_id=1,
    svn=2,
    debug=False,
    backend="sim",
    isolation="namespaces+seccomp",
    report_data=b"n" * 64,
    platform_root="self-certified",
)


def test_token_round_trip_and_statuses():
    key = ear.VerifierKey.generate()
    result = evaluate(default_policy(), APPRAISAL)
    token = ear.issue(key, APPRAISAL, result, nonce=b"nonce")
    claims = ear.verify_token(token, ear.jwks([key]))
    assert (
        claims["eat_profile"] == ear.PROFILE
        and claims["eat_nonce"] == base64.urlsafe_b64encode(b"nonce").rstrip(b"=").decode()
    )
    assert claims["submods"]["platform"]["ear.status"] == "contraindicated"
    assert claims["submods"]["enclave"]["ear.status"] == "affirming"
    assert claims["submods"]["platform"]["ear.trustworthiness-vector"] == {"hardware": 96, "runtime-opaque": 96}
    assert claims["cove.accepted"] is False and "self-certified" in claims["cove.reasons"][0]
    assert claims["cove.claims"]["measurement"] == "01" * 32
    assert claims["submods"]["enclave"]["ear.appraisal-policy-id"] == "cove:default"
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "ES256", "kid": key.kid, "typ": "JWT"}


def test_warning_status_when_the_policy_relaxes_a_rule():
    result = evaluate(parse_policy("[cove]\nself_certified = true\n"), APPRAISAL)
    claims = ear.claims(APPRAISAL, result)
    assert claims["submods"]["platform"]["ear.status"] == "warning" and claims["cove.accepted"] is True
    assert claims["submods"]["platform"]["ear.trustworthiness-vector"]["hardware"] == 32


def test_tokens_from_other_keys_tampered_or_expired_are_rejected():
    key, other = ear.VerifierKey.generate(), ear.VerifierKey.generate()
    result = evaluate(default_policy(), APPRAISAL)
    token = ear.issue(key, APPRAISAL, result)
    with pytest.raises(ear.TokenError):
        ear.verify_token(token, [other])
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["cove.accepted"] = True
    forged_body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(ear.TokenError):
        ear.verify_token(f"{head}.{forged_body}.{sig}", [key])
    old = ear.issue(key, APPRAISAL, result, issued_at=int(time.time()) - 7200)
    with pytest.raises(ear.TokenError, match="expired|exp"):
        ear.verify_token(old, [key])
    with pytest.raises(ear.TokenError):
        ear.verify_token("not.a.token", [key])


def test_key_is_made_once_root_only(tmp_path):
    path = tmp_path / "cfg" / "verifier-key.pem"
    a = ear.VerifierKey.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ear.VerifierKey.load_or_create(path).kid == a.kid
    doc = ear.jwks([a])
    assert doc["keys"][0]["kid"] == a.kid and "d" not in doc["keys"][0] and doc["keys"][0]["alg"] == "ES256"


def test_cli_token_and_jwks(cove, tmp_path):
    from cove.platform import endorse, pak
    from cove.platform.reports import EnclaveClaims, ReportSigner
    from cove.platform.runtime_measurement import runtime_hash

    key = pak.generate()
    signer = ReportSigner(key, endorse.self_certified(pak.spki(key), runtime_hash()))
    evidence = tmp_path / "evidence.cbor"
    evidence.write_bytes(
        signer.evidence(EnclaveClaims(b"\x01" * 32, b"\x02" * 32, 0, 0, False, "sim", "x", "i"), b"n" * 64)
    )
    policy = tmp_path / "p.toml"
    policy.write_text("[cove]\nself_certified = true\n")
    token_key = tmp_path / "vk.pem"
    cove.ok("keygen", "--verifier", "--out", token_key)  # --token-key names an existing key, never makes one
    out = cove.ok(
        "verify", evidence, "--policy", policy, "--token", "--token-key", token_key, "--nonce", (b"n" * 8).hex()
    ).stdout.strip()
    jwks = json.loads(cove.ok("jwks", "--token-key", token_key).stdout)
    claims = ear.verify_token(out, jwks)
    assert claims["cove.accepted"] is True and claims["cove.evidence-type"] == "cove"
    rejected = cove("verify", evidence, "--token", "--token-key", token_key)
    assert rejected.returncode == 6  # the default policy refuses self-certified evidence...
    assert ear.verify_token(rejected.stdout.strip(), jwks)["cove.accepted"] is False  # ...and the token says so
