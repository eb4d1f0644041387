"""Attestation results as EAR tokens (draft-ietf-rats-ear): a JWT the verifier signs.

A relying party that trusts the verifier's key (published as a JWKS) need
not re-verify evidence: the token carries an ``ear.status`` per submodule
(``platform``: the root of trust and TCB; ``enclave``: what runs and the data
it bound), a trustworthiness vector, the policy id, the reasons of any
rejection and the appraised claims. The verifier key is ECDSA P-256 (ES256),
made with ``cryptography``; JOSE is joserfc's.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet
from joserfc.jwt import JWTClaimsRegistry

from cove import __version__
from cove.attest.appraisal import Appraisal, summary
from cove.attest.policy import PolicyResult
from cove.errors import CoveError
from cove.util import write_atomic

PROFILE = "tag:github.com,2023:veraison/ear"
ALG = "ES256"
VALIDITY = 3600  # seconds a token stays valid
# AR4SI trustworthiness tiers
TIERS = {"affirming": 2, "warning": 32, "contraindicated": 96, "none": 0}
VECTOR_CLAIMS = {
    "enclave": ("instance-identity", "configuration", "executables"),
    "platform": ("hardware", "runtime-opaque"),
}


class TokenError(CoveError):
    """An attestation token is malformed, badly signed, expired or from an unknown key."""

    exit_code = 5


class VerifierKey:
    """The verifier's signing key and its key id (the JWK thumbprint)."""

    def __init__(self, private: ec.EllipticCurvePrivateKey):
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self.jwk = ECKey.import_key(pem)
        self.kid = self.jwk.thumbprint()

    @classmethod
    def generate(cls) -> VerifierKey:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def load_or_create(cls, path: Path) -> VerifierKey:
        """The key in ``path`` (PEM), made (root-only) on first use."""
        path = Path(path)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), None)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            key = ec.generate_private_key(ec.SECP256R1())
            write_atomic(
                path,
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                ),
                mode=0o600,
            )
        except (OSError, ValueError) as exc:
            raise CoveError(f"verifier key {path}: cannot load: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise CoveError(f"verifier key {path} is not an ECDSA P-256 key")
        return cls(key)

    def public_jwk(self) -> dict[str, Any]:
        return dict(self.jwk.as_dict(private=False), kid=self.kid, alg=ALG, use="sig")


def jwks(keys: list[VerifierKey]) -> dict[str, Any]:
    """The JWKS document relying parties fetch to check tokens."""
    return {"keys": [k.public_jwk() for k in keys]}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(
    appraisal: Appraisal,
    result: PolicyResult,
    *,
    nonce: bytes | None = None,
    issued_at: int | None = None,
    validity: int = VALIDITY,
) -> dict[str, Any]:
    """The EAR claims set for one appraisal."""
    iat = int(time.time()) if issued_at is None else issued_at
    submods: dict[str, Any] = {}
    for component, status in result.components.items():
        vector = {name: TIERS[status] for name in VECTOR_CLAIMS.get(component, ())}
        submods[component] = {
            "ear.status": status,
            "ear.trustworthiness-vector": vector,
            "ear.appraisal-policy-id": result.policy_id,
        }
    out: dict[str, Any] = {
        "eat_profile": PROFILE,
        "iat": iat,
        "exp": iat + validity,
        "ear.verifier-id": {"developer": "cove", "build": f"cove {__version__}"},
        "submods": submods,
        "cove.evidence-type": appraisal.evidence_type,
        "cove.accepted": result.accepted,
        "cove.reasons": list(result.reasons),
        "cove.warnings": list(result.warnings),
        "cove.claims": summary(appraisal),
    }
    if nonce is not None:
        out["eat_nonce"] = _b64(nonce)
    return out


def issue(
    key: VerifierKey,
    appraisal: Appraisal,
    result: PolicyResult,
    *,
    nonce: bytes | None = None,
    issued_at: int | None = None,
    validity: int = VALIDITY,
) -> str:
    """A signed EAR token (compact JWS)."""
    return jwt.encode(
        {"alg": ALG, "kid": key.kid, "typ": "JWT"},
        claims(appraisal, result, nonce=nonce, issued_at=issued_at, validity=validity),
        key.jwk,
    )


def verify_token(
    token: str, keys: dict[str, Any] | list[VerifierKey] | VerifierKey, *, now: int | None = None
) -> dict[str, Any]:
    """The claims of a token signed by one of ``keys`` (a JWKS dict or key objects), unexpired."""
    if isinstance(keys, VerifierKey):
        keys = [keys]
    document = keys if isinstance(keys, dict) else jwks(keys)
    try:
        keyset = KeySet.import_key_set({"keys": document["keys"]})
        decoded = jwt.decode(token.strip(), keyset, algorithms=[ALG])
        JWTClaimsRegistry(
            now=now,
            leeway=60,
            iat={"essential": True},
            exp={"essential": True},
            eat_profile={"essential": True, "value": PROFILE},
        ).validate(decoded.claims)
    except JoseError as exc:
        raise TokenError(f"attestation token rejected: {exc.error}: {exc.description or exc}") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise TokenError(f"attestation token is malformed ({type(exc).__name__})") from None
    if decoded.header.get("kid") not in {k.get("kid") for k in document.get("keys", [])}:
        raise TokenError("attestation token is signed by a key not in the JWKS")
    if not isinstance(decoded.claims.get("submods"), dict):
        raise TokenError("attestation token has no submods")
    return decoded.claims
