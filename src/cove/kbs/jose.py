"""JOSE: TEE keys, resource JWEs, attestation and admin tokens.

The broker's hot path (loading TEE keys, encrypting resources, signing
attestation tokens) builds the JOSE objects directly with ``cryptography``:
joserfc's generic machinery cost about as much again as the cryptography
itself. Everything that parses or verifies (admin tokens, attestation tokens,
the client's decryption) goes through joserfc.

- A TEE key (``runtime-data.tee-pubkey``) is an EC P-256/P-384 JWK (answered
  with ``ECDH-ES+A256KW``) or an RSA JWK of at least 2048 bits (answered with
  ``RSA-OAEP-256``); content is always ``A256GCM``. Everything is in the
  protected header (so it is authenticated); the response is the flattened
  JSON serialization the KBS protocol names.
- Attestation tokens are JWTs signed ES256 by the broker's token key, with
  ``iss``, ``iat``, ``exp``, ``jti``, the broker's ``jwk``, the
  ``tee-pubkey`` and the appraised claims.
- Admin tokens are JWTs an admin signs with an Ed25519 or EC P-256/P-384 key the
  broker has registered under the ``kid`` name, short-lived, for this
  broker's audience.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import secrets as pysecrets
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from joserfc import jwe, jwk, jwt
from joserfc.errors import JoseError

from cove.kbs.problems import Problem

CONTENT_ENC = "A256GCM"
ALG_FOR = {"EC": "ECDH-ES+A256KW", "RSA": "RSA-OAEP-256"}
TOKEN_ALG = "ES256"
ADMIN_ALGS = ("Ed25519", "ES256", "ES384")
ADMIN_TOKEN_MAX_LIFETIME = 300
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


_CURVES = {"P-256": (ec.SECP256R1(), 32), "P-384": (ec.SECP384R1(), 48)}
_MAX_RSA_BITS = 16384


def tee_key(value) -> tuple[ec.EllipticCurvePublicKey | rsa.RSAPublicKey, str]:
    """The TEE's public key from runtime-data and the JWE algorithm to answer with."""
    if not isinstance(value, dict):
        raise Problem("InvalidRequest", "runtime-data.tee-pubkey must be a JWK object")
    kty = value.get("kty")
    if kty not in ALG_FOR:
        raise Problem("InvalidRequest", f"tee-pubkey kty {kty!r} is not EC or RSA")
    if any(member in value for member in _PRIVATE_MEMBERS):
        raise Problem("InvalidRequest", "tee-pubkey carries private key material; send only the public key")
    alg = ALG_FOR[kty]
    if "alg" in value and value["alg"] != alg:
        raise Problem("InvalidRequest", f"tee-pubkey alg {value['alg']!r} is not supported; use {alg}")
    if kty == "EC" and value.get("crv") not in _CURVES:
        raise Problem("InvalidRequest", f"tee-pubkey curve {value.get('crv')!r} is not P-256 or P-384")
    try:
        if kty == "EC":
            key = _ec_public(value["crv"], value["x"], value["y"])
        else:
            key = _rsa_public(value["n"], value["e"])
    except (KeyError, ValueError, TypeError) as exc:
        raise Problem("InvalidRequest", f"tee-pubkey is not a valid public key: {exc}") from None
    return key, alg


def _b64_int(text: str, max_chars: int) -> int:
    if not isinstance(text, str) or not text or len(text) > max_chars:
        raise ValueError("a key member is not a base64url integer of the right size")
    return int.from_bytes(_b64(text), "big")


@functools.lru_cache(maxsize=1024)
def _ec_public(crv: str, x: str, y: str) -> ec.EllipticCurvePublicKey:
    """Load (and check on the curve) an EC key; cached, since /attest and /resource load the same one."""
    curve, size = _CURVES[crv]
    limit = 2 * size  # base64url of `size` bytes is under 2*size characters
    return ec.EllipticCurvePublicNumbers(_b64_int(x, limit), _b64_int(y, limit), curve).public_key()


def _rsa_public(n: str, e: str) -> rsa.RSAPublicKey:
    key = rsa.RSAPublicNumbers(_b64_int(e, 16), _b64_int(n, _MAX_RSA_BITS // 6 + 4)).public_key()
    if key.key_size < 2048:
        raise ValueError("RSA keys must have at least 2048 bits")
    return key


def encrypt_to(tee_pubkey: dict, plaintext: bytes) -> dict:
    """A flattened JWE of plaintext for the TEE key, every header member protected."""
    key, alg = tee_key(tee_pubkey)
    cek = os.urandom(32)
    if isinstance(key, ec.EllipticCurvePublicKey):
        header, encrypted_key = _ecdh_es_a256kw(key, cek)
    else:
        header = {"alg": alg, "enc": CONTENT_ENC}
        encrypted_key = key.encrypt(cek, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
    protected = _b64e(json.dumps(header, separators=(",", ":")).encode())
    iv = os.urandom(12)
    sealed = AESGCM(cek).encrypt(iv, plaintext, protected.encode("ascii"))
    return {"protected": protected, "encrypted_key": _b64e(encrypted_key), "iv": _b64e(iv),
            "ciphertext": _b64e(sealed[:-16]), "tag": _b64e(sealed[-16:])}


def _ecdh_es_a256kw(key: ec.EllipticCurvePublicKey, cek: bytes) -> tuple[dict, bytes]:
    """RFC 7518 4.6: an ephemeral key, ECDH, Concat KDF (no apu/apv), AES key wrap of the CEK."""
    crv = "P-256" if key.curve.name == "secp256r1" else "P-384"
    size = _CURVES[crv][1]
    ephemeral = ec.generate_private_key(key.curve)
    shared = ephemeral.exchange(ec.ECDH(), key)
    alg = ALG_FOR["EC"].encode()
    other = len(alg).to_bytes(4, "big") + alg + bytes(8) + (256).to_bytes(4, "big")
    kek = ConcatKDFHash(hashes.SHA256(), 32, other).derive(shared)
    numbers = ephemeral.public_key().public_numbers()
    epk = {"kty": "EC", "crv": crv, "x": _b64e(numbers.x.to_bytes(size, "big")),
           "y": _b64e(numbers.y.to_bytes(size, "big"))}
    return {"alg": ALG_FOR["EC"], "enc": CONTENT_ENC, "epk": epk}, aes_key_wrap(kek, cek)


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def decrypt_from(document: dict, private_key: jwk.Key) -> bytes:
    """Open a resource JWE with the TEE's private key; any tampering raises ValueError."""
    if not isinstance(document, dict) or "protected" not in document or "ciphertext" not in document:
        raise ValueError("the response is not a flattened JWE")
    alg = ALG_FOR.get(private_key.key_type)
    try:
        header = json.loads(_b64(document["protected"]))
        if header.get("alg") != alg or header.get("enc") != CONTENT_ENC:
            raise ValueError(f"unexpected JWE algorithms {header.get('alg')}/{header.get('enc')}")
        if "aad" in document or "header" in document or "unprotected" in document:
            raise ValueError("the JWE carries members outside the protected header")
        result = jwe.decrypt_json(document, private_key, algorithms=[alg, CONTENT_ENC])
    except (JoseError, KeyError, TypeError) as exc:
        raise ValueError(f"the JWE does not decrypt: {type(exc).__name__}") from None
    return bytes(result.plaintext or b"")


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_tee_key(kind: str = "EC") -> jwk.Key:
    """An ephemeral TEE key pair (EC P-256 by default, or RSA 3072)."""
    return jwk.generate_key("EC", "P-256") if kind == "EC" else jwk.generate_key("RSA", 3072)


def public_jwk(key: jwk.Key) -> dict:
    public = key.as_dict(private=False)
    public["alg"] = ALG_FOR[key.key_type]
    return public


# -- attestation tokens --------------------------------------------------------------------
class TokenIssuer:
    """Signs and checks this broker's attestation tokens."""

    def __init__(self, signing_key: jwk.Key, issuer: str, lifetime: float):
        self.key = signing_key
        self.issuer = issuer
        self.lifetime = lifetime
        self.public = signing_key.as_dict(private=False)
        self.kid = jwk.thumbprint(self.public)
        self.public["kid"] = self.kid
        self.public["alg"] = TOKEN_ALG
        self.public["use"] = "sig"
        self._signer = signing_key.private_key
        self._header = _b64e(json.dumps({"alg": TOKEN_ALG, "typ": "JWT", "kid": self.kid},
                                        separators=(",", ":")).encode())

    def issue(self, tee_pubkey: dict, claims: dict, evaluation: str, now: float | None = None) -> str:
        now = int(now if now is not None else time.time())
        body = {"iss": self.issuer, "iat": now, "nbf": now, "exp": now + int(self.lifetime),
                "jti": pysecrets.token_hex(16), "jwk": self.public, "tee-pubkey": tee_pubkey,
                "tee": claims.get("tee"), "tcb-status": claims, "evaluation-report": evaluation}
        return self._sign(body)

    def _sign(self, body: dict) -> str:
        """A compact ES256 JWS (RFC 7515), signed directly: joserfc's encode costs twice the ECDSA."""
        signing_input = f"{self._header}.{_b64e(json.dumps(body, separators=(',', ':')).encode())}"
        r, s = decode_dss_signature(self._signer.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64e(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def verify(self, token: str, now: float | None = None) -> dict:
        """The claims of a token this broker issued and that is still valid, or a 401 problem."""
        try:
            decoded = jwt.decode(token, self.key, algorithms=[TOKEN_ALG])
        except (JoseError, ValueError, TypeError, UnicodeDecodeError) as exc:
            raise Problem("TokenVerifierError",
                          f"the token is not signed by this broker ({type(exc).__name__})") from None
        claims = decoded.claims
        now = now if now is not None else time.time()
        if claims.get("iss") != self.issuer:
            raise Problem("TokenVerifierError", "the token was issued by another broker")
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or exp < now:
            raise Problem("TokenVerifierError", "the token has expired; attest again")
        if not isinstance(claims.get("tee-pubkey"), dict) or not isinstance(claims.get("tcb-status"), dict):
            raise Problem("TokenVerifierError", "the token lacks tee-pubkey or claims")
        return claims


# -- admin tokens ------------------------------------------------------------------------------
def make_admin_token(private_key: jwk.Key, key_name: str, audience: str, lifetime: int = 60,
                     now: float | None = None) -> str:
    """What `cove kbs admin` sends as its bearer token."""
    now = int(now if now is not None else time.time())
    alg = _admin_alg(private_key)
    return jwt.encode({"alg": alg, "typ": "JWT", "kid": key_name},
                      {"aud": audience, "iat": now, "exp": now + lifetime, "jti": pysecrets.token_hex(8),
                       "sub": key_name}, private_key, algorithms=[alg])


def _admin_alg(key: jwk.Key) -> str:
    if key.key_type == "OKP":
        return "Ed25519"  # RFC 9864's fully specified name for EdDSA with Ed25519
    if key.key_type == "EC":
        return {"P-256": "ES256", "P-384": "ES384"}.get(key.as_dict().get("crv"), "")
    raise ValueError("admin keys are Ed25519 or EC P-256/P-384")


def admin_key_name(token: str) -> str:
    """The kid of an admin token, before its signature is checked (to find the key)."""
    try:
        header = json.loads(_b64(token.split(".")[0]))
    except Exception:
        raise Problem("AdminAuth", "the bearer token is not a JWT") from None
    kid = header.get("kid") if isinstance(header, dict) else None
    if not isinstance(kid, str) or not kid:
        raise Problem("AdminAuth", "the admin token names no key (kid)")
    return kid


def verify_admin_token(token: str, public: dict, audience: str, now: float | None = None) -> dict:
    """Check an admin token against the registered public key; a 401 problem otherwise."""
    try:
        key = jwk.import_key(public, public.get("kty"))
        decoded = jwt.decode(token, key, algorithms=[_admin_alg(key)])
    except (JoseError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise Problem("AdminAuth", f"the admin token's signature is not valid ({type(exc).__name__})") from None
    claims = decoded.claims
    now = now if now is not None else time.time()
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, (int, float)) or not isinstance(iat, (int, float)):
        raise Problem("AdminAuth", "the admin token lacks iat or exp")
    if exp < now or iat > now + 60 or exp - iat > ADMIN_TOKEN_MAX_LIFETIME:
        raise Problem("AdminAuth", "the admin token has expired or lives too long; sign a fresh one")
    if claims.get("aud") != audience:
        raise Problem("AdminAuth", "the admin token is for another broker")
    return claims


def load_private_jwk(text: str | bytes) -> jwk.Key:
    """An admin's private key from a JWK (JSON) or a PEM file's text."""
    raw = text.encode() if isinstance(text, str) else text
    stripped = raw.strip()
    if stripped.startswith(b"{"):
        data = json.loads(stripped)
        return jwk.import_key(data, data.get("kty"))
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    key = serialization.load_pem_private_key(stripped, password=None)
    kty = "OKP" if isinstance(key, ed25519.Ed25519PrivateKey) else "EC" if isinstance(
        key, ec.EllipticCurvePrivateKey) else "RSA"
    return jwk.import_key(stripped, kty)
