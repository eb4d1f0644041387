"""JOSE: TEE keys, resource JWEs, attestation and admin tokens.

Everything received is checked by joserfc (tokens presented as bearers,
admin tokens, JWE headers) or by cryptography itself (a TEE key's numbers).
Two things the broker sends are assembled here from ``cryptography``
primitives, and read back by joserfc in tests: the resource JWE (below) and
the attestation token's compact JWS (``TokenIssuer._sign``, a third less CPU
than joserfc's encoder). Each TEE key is imported once per process (/attest
and /resource load the same one), from its numbers by cryptography.

- A TEE key (``runtime-data.tee-pubkey``) is an EC P-256/P-384/P-521 JWK
  (answered with ``ECDH-ES+A256KW``; coordinates at their full length) or an RSA
  JWK of at least 2048 bits with an odd e, 3 <= e < 2**32 (answered with
  ``RSA-OAEP-256``); members in canonical base64url; content is always ``A256GCM``. Everything
  is in the protected header (so it is authenticated); the response is the
  flattened JSON serialization the KBS protocol names. The resource JWE is the
  one exception to "through joserfc": the Confidential Containers client does
  not use the received ``protected`` string as the AEAD's additional data but
  re-serializes the parsed header with serde_json (sorted or insertion order,
  depending on its build), so the header must be written with sorted members
  and no whitespace, which joserfc cannot be told to do (it writes ``epk`` as
  crv, x, y, kty). It is built here from ``cryptography`` primitives (Concat
  KDF, AES key wrap, AES-GCM, RSA-OAEP) and read back by joserfc in tests.
- Attestation tokens are JWTs signed ES256 by the broker's token key, with
  ``iss``, ``iat``, ``exp``, ``jti``, the broker's ``jwk``, the
  ``tee-pubkey`` and the appraised claims; header ``{"alg", "typ", "kid"}``
  and claims are JSON without whitespace, the signature raw ``r || s``.
- Admin tokens are JWTs an admin signs with an Ed25519 or EC P-256/P-384 key the
  broker has registered under the ``kid`` name, short-lived, for this
  broker's audience.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import secrets as pysecrets
import time
from typing import Any, Literal, cast

from cryptography.hazmat.primitives import hashes, keywrap
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from joserfc import jwe, jwk, jwt
from joserfc.errors import JoseError

from cove.decode import Fields, decode_json
from cove.kbs.problems import Problem

CONTENT_ENC = "A256GCM"
ALG_FOR = {"EC": "ECDH-ES+A256KW", "RSA": "RSA-OAEP-256"}
TOKEN_ALG = "ES256"
ADMIN_ALGS = ("Ed25519", "ES256", "ES384")
ADMIN_TOKEN_MAX_LIFETIME = 300
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


_COORDINATE_BYTES = {"P-256": 32, "P-384": 48, "P-521": 66}
_ES256 = ec.ECDSA(hashes.SHA256())
_MAX_RSA_BITS = 16384
_MAX_RSA_E = 1 << 32


def tee_key(value: Any) -> tuple[jwk.Key, str]:
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
    if kty == "EC" and value.get("crv") not in _COORDINATE_BYTES:
        raise Problem("InvalidRequest", f"tee-pubkey curve {value.get('crv')!r} is not P-256, P-384 or P-521")
    try:
        if kty == "EC":
            size = _COORDINATE_BYTES[value["crv"]]  # RFC 7518 6.2.1.2: each coordinate at its full length
            chars = (4 * size + 2) // 3
            key = _import_public(
                ("EC", value["crv"], _member(value, "x", chars, chars), _member(value, "y", chars, chars))
            )
        else:
            key = _import_public(("RSA", _member(value, "n", _MAX_RSA_BITS // 6 + 4), _member(value, "e", 6)))
    except (JoseError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise Problem("InvalidRequest", f"tee-pubkey is not a valid public key: {exc}") from None
    return key, alg


def _member(value: dict[str, Any], name: str, max_chars: int, min_chars: int = 1) -> str:
    """A key member, bounded in size so that the cache of imported keys stays small."""
    text = value[name]
    if not isinstance(text, str) or not min_chars <= len(text) <= max_chars:
        raise ValueError(f"{name} is not a base64url integer of the right size")
    return text


@functools.lru_cache(maxsize=1024)
def _import_public(members: tuple[Any, ...]) -> jwk.Key:
    """Import (and check: on the curve, RSA size) a public key; cached per process.

    cryptography builds and checks the key from its numbers (a point off the curve, an even or
    out-of-range exponent are refused there), as joserfc's import does, at a quarter of the cost;
    the key is handed on in joserfc's wrapper."""
    if members[0] == "EC":
        curve = _CURVES[members[1]]
        point = ec.EllipticCurvePublicNumbers(_b64_int(members[2]), _b64_int(members[3]), curve)
        return jwk.ECKey(point.public_key(), None)
    e = _b64_int(members[2])
    if not (e & 1 and 3 <= e < _MAX_RSA_E):  # OpenSSL refuses to encrypt with e over 64 bits for n over 3072
        raise ValueError("RSA e must be odd, at least 3 and below 2**32 (65537 is usual)")
    public = rsa.RSAPublicNumbers(e, _b64_int(members[1])).public_key()
    if public.key_size < 2048:
        raise ValueError("RSA keys must have at least 2048 bits")
    return jwk.RSAKey(public, None)


_CURVES: dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


def _b64_int(text: str) -> int:
    """A JWK integer member: base64url without padding (RFC 7515 section 2), big-endian.

    Canonical only: the text must be what encoding its bytes gives back (``AB`` decodes as ``AA``
    would: two spellings of one key are refused, as are padding and the standard alphabet)."""
    if not _BASE64URL.fullmatch(text):
        raise ValueError("a key member is not base64url")
    raw = _b64(text)
    if _b64e(raw) != text:
        raise ValueError("a key member is not canonical base64url")
    return int.from_bytes(raw, "big")


def encrypt_to(tee_pubkey: dict[str, Any], plaintext: bytes) -> dict[str, Any]:
    """A flattened JWE of plaintext for the TEE key, every header member protected.

    The protected header is JSON with sorted members at every level and no
    whitespace: the bytes a CoCo client rebuilds from it whether its
    serde_json keeps insertion order or sorts (docs/formats/kbs-protocol.md).
    """
    key, alg = tee_key(tee_pubkey)
    public = key.raw_value  # a cryptography public key
    cek = AESGCM.generate_key(256)
    header: dict[str, Any] = {"alg": alg, "enc": CONTENT_ENC}
    if isinstance(public, rsa.RSAPublicKey):
        encrypted_key = public.encrypt(cek, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
    elif isinstance(public, ec.EllipticCurvePublicKey):
        ephemeral = ec.generate_private_key(public.curve)
        size = _COORDINATE_BYTES[tee_pubkey["crv"]]
        numbers = ephemeral.public_key().public_numbers()
        header["epk"] = {
            "crv": tee_pubkey["crv"],
            "kty": "EC",
            "x": _b64e(numbers.x.to_bytes(size, "big")),
            "y": _b64e(numbers.y.to_bytes(size, "big")),
        }
        # RFC 7518 4.6.2: Concat KDF over Z; AlgorithmID = "ECDH-ES+A256KW", empty apu/apv, keydatalen 256
        other = b"".join((len(alg).to_bytes(4, "big"), alg.encode(), bytes(8), (256).to_bytes(4, "big")))
        kek = ConcatKDFHash(hashes.SHA256(), 32, other).derive(ephemeral.exchange(ec.ECDH(), public))
        encrypted_key = keywrap.aes_key_wrap(kek, cek)
    else:  # tee_key imports EC and RSA keys only
        raise Problem("InvalidRequest", "tee-pubkey is not an EC or RSA public key")
    protected = _b64e(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    iv = pysecrets.token_bytes(12)
    sealed = AESGCM(cek).encrypt(iv, plaintext, protected.encode("ascii"))
    return {
        "protected": protected,
        "encrypted_key": _b64e(encrypted_key),
        "iv": _b64e(iv),
        "ciphertext": _b64e(sealed[:-16]),
        "tag": _b64e(sealed[-16:]),
    }


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def decrypt_from(document: dict[str, Any], private_key: jwk.Key) -> bytes:
    """Open a resource JWE with the TEE's private key; any tampering raises ValueError."""
    if not isinstance(document, dict) or "protected" not in document or "ciphertext" not in document:
        raise ValueError("the response is not a flattened JWE")
    alg = ALG_FOR.get(private_key.key_type)
    if alg is None:
        raise ValueError(f"a {private_key.key_type} key cannot open a resource JWE")
    try:
        header = Fields(
            decode_json(_b64(document["protected"]), ValueError, "the JWE protected header"),
            "the JWE protected header",
            ValueError,
        ).map
        if header.get("alg") != alg or header.get("enc") != CONTENT_ENC:
            raise ValueError(f"unexpected JWE algorithms {header.get('alg')}/{header.get('enc')}")
        if "aad" in document or "header" in document or "unprotected" in document:
            raise ValueError("the JWE carries members outside the protected header")
        result = jwe.decrypt_json(cast(Any, document), private_key, algorithms=[alg, CONTENT_ENC])
    except (JoseError, KeyError, TypeError) as exc:
        raise ValueError(f"the JWE does not decrypt: {type(exc).__name__}") from None
    return bytes(result.plaintext or b"")


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_tee_key(kind: str = "EC") -> jwk.Key:
    """An ephemeral TEE key pair: "EC" (P-256, the default), "EC-P384", "EC-P521", or "RSA" (3072)."""
    if kind.startswith("EC"):
        return jwk.generate_key("EC", _TEE_CURVES[kind])
    return jwk.generate_key("RSA", 3072)


_TEE_CURVES: dict[str, Literal["P-256", "P-384", "P-521"]] = {"EC": "P-256", "EC-P384": "P-384", "EC-P521": "P-521"}


def public_jwk(key: jwk.Key) -> dict[str, Any]:
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
        self._header = {"alg": TOKEN_ALG, "typ": "JWT", "kid": self.kid}
        private = signing_key.raw_value
        if not isinstance(private, ec.EllipticCurvePrivateKey) or private.curve.name != "secp256r1":
            raise ValueError("the token key must be a private EC P-256 key (ES256)")
        self._private = private
        self._encoded_header = _b64e(json.dumps(self._header, separators=(",", ":")).encode())

    def issue(
        self, tee_pubkey: dict[str, Any], claims: dict[str, Any], evaluation: str, now: float | None = None
    ) -> str:
        now = int(now if now is not None else time.time())
        body = {
            "iss": self.issuer,
            "iat": now,
            "nbf": now,
            "exp": now + int(self.lifetime),
            "jti": pysecrets.token_hex(16),
            "jwk": self.public,
            "tee-pubkey": tee_pubkey,
            "tee": claims.get("tee"),
            "tcb-status": claims,
            "evaluation-report": evaluation,
        }
        return self._sign(body)

    def _sign(self, claims: dict[str, Any]) -> str:
        """The JWS compact serialization (RFC 7515 7.1) of claims, signed ES256 (RFC 7518 3.4).

        Assembled here over cryptography's ECDSA rather than by joserfc's jwt.encode: a third less
        CPU per token. The signature is the raw r || s, each 32 bytes big-endian. Tokens are checked
        by joserfc (:meth:`verify`), and tests read them with joserfc's own decoder."""
        payload = _b64e(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{self._encoded_header}.{payload}"
        r, s = decode_dss_signature(self._private.sign(signing_input.encode("ascii"), _ES256))
        return f"{signing_input}.{_b64e(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def verify(self, token: str, now: float | None = None) -> dict[str, Any]:
        """The claims of a token this broker issued and that is still valid, or a 401 problem."""
        try:
            decoded = jwt.decode(token, self.key, algorithms=[TOKEN_ALG])
        except (JoseError, ValueError, TypeError, UnicodeDecodeError) as exc:
            raise Problem(
                "TokenVerifierError", f"the token is not signed by this broker ({type(exc).__name__})"
            ) from None
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
def make_admin_token(
    private_key: jwk.Key, key_name: str, audience: str, lifetime: int = 60, now: float | None = None
) -> str:
    """What `cove kbs admin` sends as its bearer token."""
    now = int(now if now is not None else time.time())
    alg = admin_alg(private_key)
    return jwt.encode(
        {"alg": alg, "typ": "JWT", "kid": key_name},
        {"aud": audience, "iat": now, "exp": now + lifetime, "jti": pysecrets.token_hex(8), "sub": key_name},
        private_key,
        algorithms=[alg],
    )


def admin_alg(key: jwk.Key) -> str:
    """The JWS algorithm of an admin key: "" for a curve admins may not use, ValueError for a key type."""
    crv = key.as_dict().get("crv") if key.key_type in ("OKP", "EC") else None
    if key.key_type == "OKP":  # RFC 9864's fully specified name for EdDSA with Ed25519; an X25519 key signs nothing
        return "Ed25519" if crv == "Ed25519" else ""
    if key.key_type == "EC":
        return {"P-256": "ES256", "P-384": "ES384"}.get(crv, "") if isinstance(crv, str) else ""
    raise ValueError("admin keys are Ed25519 or EC P-256/P-384")


def admin_key_name(token: str) -> str:
    """The kid of an admin token, before its signature is checked (to find the key)."""
    try:
        raw = _b64(token.split(".")[0])
    except ValueError:  # binascii.Error, or a header that is not ASCII
        raise _not_a_jwt("its header is not base64url") from None
    header = decode_json(raw, _not_a_jwt, "its header", limit=MAX_ADMIN_HEADER)
    kid = header.get("kid") if isinstance(header, dict) else None
    if not isinstance(kid, str) or not kid:
        raise Problem("AdminAuth", "the admin token names no key (kid)")
    return kid


MAX_ADMIN_HEADER = 4096  # {"alg", "typ", "kid"}: a few dozen bytes


def _not_a_jwt(reason: str) -> Problem:
    return Problem("AdminAuth", f"the bearer token is not a JWT ({reason})")


def verify_admin_token(token: str, public: dict[str, Any], audience: str, now: float | None = None) -> dict[str, Any]:
    """Check an admin token against the registered public key; a 401 problem otherwise."""
    try:
        key = jwk.import_key(public, public.get("kty"))
        decoded = jwt.decode(token, key, algorithms=[admin_alg(key)])
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
    """An admin's private key from a JWK (JSON) or a PEM file's text; ValueError for anything else."""
    raw = text.encode() if isinstance(text, str) else text
    stripped = raw.strip()
    if stripped.startswith(b"{"):
        data = decode_json(stripped, ValueError, "the JWK")
        if not isinstance(data, dict) or not isinstance(data.get("kty"), str):
            raise ValueError("the JWK names no key type (kty)")
        try:  # joserfc takes the key type from "kty"
            imported: jwk.Key = jwk.import_key(cast(dict[str, str | list[str]], data))
        except JoseError as exc:
            raise ValueError(f"the JWK is not a key ({exc})") from None
        return imported
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    key = serialization.load_pem_private_key(stripped, password=None)
    kty: Literal["OKP", "EC", "RSA"] = (
        "OKP"
        if isinstance(key, ed25519.Ed25519PrivateKey)
        else "EC"
        if isinstance(key, ec.EllipticCurvePrivateKey)
        else "RSA"
    )
    return jwk.import_key(stripped, kty)
