"""The broker's JWEs and tokens read back with the JOSE library directly, and bad TEE keys refused."""

from __future__ import annotations

import base64
import json

import pytest
from joserfc import jwe, jwk, jwt

from cove.kbs import jose
from cove.kbs.problems import Problem


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@pytest.mark.parametrize("kty, size", [("EC", "P-256"), ("EC", "P-384"), ("EC", "P-521"), ("RSA", 2048), ("RSA", 3072)])
def test_resource_jwe_opens_with_joserfc(kty, size):
    key = jwk.generate_key(kty, size)
    document = jose.encrypt_to(jose.public_jwk(key), b"\x00secret\xff" * 40)
    header = json.loads(base64.urlsafe_b64decode(document["protected"] + "=="))
    assert header["alg"] == jose.ALG_FOR[kty] and header["enc"] == "A256GCM"
    assert set(document) == {"protected", "encrypted_key", "iv", "ciphertext", "tag"}
    opened = jwe.decrypt_json(document, key, algorithms=[jose.ALG_FOR[kty], "A256GCM"])
    assert opened.plaintext == b"\x00secret\xff" * 40
    assert jose.decrypt_from(document, key) == b"\x00secret\xff" * 40


def test_resource_jwe_is_authenticated():
    key = jwk.generate_key("EC", "P-256")
    document = jose.encrypt_to(jose.public_jwk(key), b"value")
    tampered = dict(
        document, ciphertext=document["ciphertext"][:-2] + ("AA" if document["ciphertext"][-2:] != "AA" else "BA")
    )
    with pytest.raises(ValueError):
        jose.decrypt_from(tampered, key)
    other = jwk.generate_key("EC", "P-256")
    with pytest.raises(ValueError):
        jose.decrypt_from(document, other)


def test_attestation_token_verifies_with_joserfc():
    issuer = jose.TokenIssuer(jwk.generate_key("EC", "P-256"), "cove-kbs:test", 3600)
    tee = jose.public_jwk(jwk.generate_key("EC", "P-256"))
    token = issuer.issue(tee, {"tee": "cove", "measurement": "ab" * 32}, "accepted", now=1_700_000_000)
    decoded = jwt.decode(token, jwk.import_key(issuer.public, "EC"), algorithms=["ES256"])
    assert decoded.header == {"alg": "ES256", "typ": "JWT", "kid": issuer.kid}
    assert decoded.claims["tee-pubkey"] == tee and decoded.claims["exp"] == 1_700_003_600
    assert issuer.verify(token, now=1_700_000_001)["tcb-status"]["measurement"] == "ab" * 32
    forged = token[:-4] + ("AAAA" if token[-4:] != "AAAA" else "BBBB")
    with pytest.raises(Problem):
        issuer.verify(forged, now=1_700_000_001)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"y": b64e((12345).to_bytes(32, "big"))}, "not a valid public key"),  # off the curve
        ({"x": "A" * 500}, "not a valid public key"),
        ({"x": 7}, "not a valid public key"),
        ({"y": ["list"]}, "not a valid public key"),
    ],
)
def test_bad_ec_tee_keys(change, words):
    public = dict(jose.public_jwk(jwk.generate_key("EC", "P-256")), **change)
    with pytest.raises(Problem) as caught:
        jose.tee_key(public)
    assert caught.value.kind == "InvalidRequest" and words in caught.value.detail


def test_small_rsa_tee_keys_refused():
    from cryptography.hazmat.primitives.asymmetric import rsa

    numbers = rsa.generate_private_key(65537, 1024).public_key().public_numbers()
    public = {"kty": "RSA", "n": b64e(numbers.n.to_bytes(128, "big")), "e": "AQAB"}
    with pytest.raises(Problem) as caught:
        jose.tee_key(public)
    assert "at least 2048 bits" in caught.value.detail


@pytest.mark.parametrize(
    "header, reason",
    [
        (b64e(b"[" * 2000 + b"]" * 2000), "not valid JSON"),  # nested past the decoder's depth
        (b64e(b'{"kid": "a"} x'), "not valid JSON"),  # trailing bytes
        (b64e(b"\xff\xfe"), "not valid JSON"),  # not UTF-8
        ("\u00e9\u00e9\u00e9\u00e9", "not base64url"),  # not ASCII
        (b64e(b"x" * 5000), "4096"),  # oversized
    ],
)
def test_admin_key_name_refuses_hostile_headers_as_one_problem(header: str, reason: str) -> None:
    with pytest.raises(Problem, match=reason) as caught:
        jose.admin_key_name(header + ".e30.sig")
    assert caught.value.kind == "AdminAuth"


@pytest.mark.parametrize(
    "text, reason",
    [
        ('{"kty": "EC"}', "'crv' is required"),  # joserfc's own error, which escaped before
        ('{"kty": 5}', "names no key type"),
        ('{"kty": "EC"} {}', "not valid JSON"),
        ('{"a": ' * 5000, "not valid JSON"),
    ],
)
def test_load_private_jwk_refuses_hostile_keys_with_value_error(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        jose.load_private_jwk(text)
