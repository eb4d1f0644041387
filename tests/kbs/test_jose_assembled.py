"""What jose.py assembles from cryptography primitives, held against joserfc: the attestation token's
compact JWS (a token Cove signs verifies with joserfc, and one joserfc signs verifies with Cove) and
the TEE key import (the same key as joserfc's, the same refusals)."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from joserfc import jwk, jws, jwt
from joserfc.errors import JoseError

from cove.kbs import jose
from cove.kbs.problems import Problem

NOW = 1_700_000_000
CLAIMS = {"tee": "cove", "measurement": "ab" * 32, "svn": 1, "debug": False, "note": "é ✓ \u2028"}


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture(scope="module")
def issuer() -> jose.TokenIssuer:
    return jose.TokenIssuer(jwk.generate_key("EC", "P-256"), "cove-kbs:test", 3600)


def test_cove_token_verifies_with_joserfc_and_raw_ecdsa(issuer):
    tee = jose.public_jwk(jwk.generate_key("EC", "P-256"))
    token = issuer.issue(tee, CLAIMS, "accepted", now=NOW)
    decoded = jwt.decode(token, jwk.import_key(issuer.public, "EC"), algorithms=["ES256"])
    assert decoded.header == {"alg": "ES256", "typ": "JWT", "kid": issuer.kid}
    assert decoded.claims["tcb-status"] == CLAIMS and decoded.claims["tee-pubkey"] == tee
    assert (decoded.claims["iat"], decoded.claims["nbf"], decoded.claims["exp"]) == (NOW, NOW, NOW + 3600)
    assert decoded.claims["jwk"] == issuer.public and len(decoded.claims["jti"]) == 32
    head, payload, signature = token.split(".")
    raw = b64d(signature)
    assert len(raw) == 64  # r || s, not DER
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    issuer.key.raw_value.public_key().verify(der, f"{head}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))
    assert issuer.verify(token, now=NOW + 1)["tcb-status"] == CLAIMS


def test_joserfc_token_verifies_with_cove(issuer):
    body = {"iss": issuer.issuer, "exp": NOW + 60, "tee-pubkey": {"kty": "EC"}, "tcb-status": CLAIMS}
    token = jwt.encode({"alg": "ES256", "typ": "JWT", "kid": issuer.kid}, body, issuer.key, algorithms=["ES256"])
    assert issuer.verify(token, now=NOW)["tcb-status"] == CLAIMS


@pytest.mark.parametrize("part", [0, 1, 2])
def test_a_changed_part_of_a_cove_token_is_refused(issuer, part):
    parts = issuer.issue({"kty": "EC"}, CLAIMS, "accepted", now=NOW).split(".")
    if part == 0:
        parts[0] = b64e(json.dumps({"alg": "ES256", "typ": "JWT", "kid": "other"}).encode())
    elif part == 1:
        parts[1] = b64e(b64d(parts[1]).replace(b'"svn":1', b'"svn":9'))
    else:
        raw = bytearray(b64d(parts[2]))
        raw[5] ^= 1
        parts[2] = b64e(bytes(raw))
    with pytest.raises(Problem) as caught:
        issuer.verify(".".join(parts), now=NOW + 1)
    assert caught.value.kind == "TokenVerifierError"


@pytest.mark.parametrize("alg", ["none", "HS256", "ES384"])
def test_cove_verifies_es256_only(issuer, alg):
    """The algorithm is pinned: a token claiming another, signed with what an attacker has, fails."""
    payload = b64e(json.dumps({"iss": issuer.issuer, "exp": NOW + 60, "tee-pubkey": {}, "tcb-status": {}}).encode())
    head = b64e(json.dumps({"alg": alg, "typ": "JWT", "kid": issuer.kid}).encode())
    if alg == "HS256":  # the public key's bytes as an HMAC secret
        secret = json.dumps(issuer.public).encode()
        token = jws.serialize_compact({"alg": "HS256"}, payload, jwk.OctKey.import_key(secret), algorithms=["HS256"])
    elif alg == "ES384":
        token = jwt.encode({"alg": "ES384"}, {"iss": issuer.issuer}, jwk.generate_key("EC", "P-384"), ["ES384"])
    else:
        token = f"{head}.{payload}."
    with pytest.raises(Problem):
        issuer.verify(token, now=NOW)


def test_the_token_key_must_be_p256():
    with pytest.raises(ValueError, match="P-256"):
        jose.TokenIssuer(jwk.generate_key("EC", "P-384"), "cove-kbs:test", 3600)


@pytest.mark.parametrize("kty, size", [("EC", "P-256"), ("EC", "P-384"), ("EC", "P-521"), ("RSA", 2048)])
def test_tee_key_import_matches_joserfc(kty, size):
    public = jose.public_jwk(jwk.generate_key(kty, size))
    mine, alg = jose.tee_key(public)
    theirs = jwk.import_key({k: v for k, v in public.items() if k != "alg"}, kty)
    assert mine.raw_value.public_numbers() == theirs.raw_value.public_numbers()
    assert mine.as_dict(private=False) == theirs.as_dict(private=False) and alg == jose.ALG_FOR[kty]


def _ec(**change: str) -> dict:
    return dict(jose.public_jwk(jwk.generate_key("EC", "P-256")), **change)


def _rsa(e: int, bits: int = 2048) -> dict:
    n = rsa.generate_private_key(65537, bits).public_key().public_numbers().n
    return {"kty": "RSA", "n": b64e(n.to_bytes(bits // 8, "big")), "e": b64e(e.to_bytes(3, "big").lstrip(b"\0"))}


@pytest.mark.parametrize(
    "key, joserfc_refuses",
    [
        (_ec(y=b64e(b"\x01" * 32)), True),  # off the curve
        (_ec(crv="P-384"), True),  # P-256 numbers named P-384: not on that curve
        (_ec(x="a+b/c"), False),  # standard base64, not base64url
        (_ec(x="abc="), False),  # padded
        (_ec(x="a"), True),  # not base64 at all
        (_ec(x=b64e(b"\x00" * 31 + b"\x07")), True),  # a small coordinate: not a point
        (_rsa(4), True),  # an even exponent
        (_rsa(1), True),  # too small an exponent
    ],
)
def test_hostile_tee_keys_refused(key, joserfc_refuses):
    with pytest.raises(Problem, match="not a valid public key") as caught:
        jose.tee_key(key)
    assert caught.value.kind == "InvalidRequest"
    if joserfc_refuses:  # cove is at least as strict as the library it replaced here
        with pytest.raises((JoseError, ValueError)):
            jwk.import_key({k: v for k, v in key.items() if k != "alg"}, key["kty"])
