"""The broker's logic, independent of HTTP: sessions, attestation, release, admin.

Every decision is here, and every refusal is a :class:`~cove.kbs.problems.Problem`.
State lives in the :class:`~cove.kbs.store.Store` only, so any number of
processes sharing one database act as one broker.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import re
import secrets as pysecrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.exceptions import UnsupportedAlgorithm
from joserfc import jwk
from joserfc.errors import JoseError

from cove.attest import certs
from cove.kbs import (
    broker_policy as policy_mod,
    coco_binding,
    coco_collateral,
    coco_evidence,
    evidence_appraisal,
    jose,
    secrets as secrets_mod,
)
from cove.decode import Fields, decode_json
from cove.kbs.problems import Problem
from cove.kbs.store import ReleaseRow, SecretRow, SessionRow, Store
from cove.kbs.vault import Vault

ROLES = ("admin", "auditor")
# Roles and what they may do: auditors read metadata and the audit log, never values.
WRITE_ACTIONS = (
    "secret.create",
    "secret.rotate",
    "secret.delete",
    "secret.export",
    "secret.policy",
    "policy.put",
    "policy.delete",
    "key.add",
    "key.delete",
)
# What importing a hostile JWK raises (a probe of joserfc 1.x: its errors, ValueError incl. binascii.Error,
# KeyError for a missing member, TypeError for a mistyped one, cryptography's UnsupportedAlgorithm).
_JWK_ERRORS = (JoseError, ValueError, KeyError, TypeError, UnsupportedAlgorithm)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^0\.([0-9]+)\.([0-9]+)$")


def _label(session_id: str) -> str:
    """How the audit log names a session: a hash, since the id itself is a bearer credential."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:12]


@dataclass
class Settings:
    """How a broker behaves; `cove kbs serve` fills it from its options."""

    db_url: str
    master_key: bytes
    issuer: str | None = None  # default: cove-kbs:<broker id>
    challenge_lifetime: float = 300.0  # seconds between /auth and /attest
    session_lifetime: float = 300.0  # an attested cookie session
    token_lifetime: float = 3600.0
    attestation_policy: str | None = None  # text; None = the default policy
    anchors: evidence_appraisal.TrustAnchors = field(default_factory=evidence_appraisal.TrustAnchors)
    clock: Callable[[], float] = time.time  # sessions, tokens; tests move it
    evidence_time: Callable[[], dt.datetime] | None = None  # time evidence is checked at (default: clock)
    collateral_dir: str | None = None  # DCAP collateral for quotes sent without it (`cove kbs collateral import`)
    pccs_url: str | None = None  # else fetched from this PCCS
    pool_size: int = 16


@dataclass(frozen=True)
class Caller:
    """Who asks for a resource: the claims and TEE key behind a cookie or a token."""

    claims: dict[str, Any]
    tee_pubkey: dict[str, Any]
    via: str  # "cookie" or "token"
    session: str | None = None


# Evidence types appraised from the evidence alone, with a few signature checks: never a network
# fetch (DCAP quotes sent without collateral are completed from a PCCS) nor a long certificate walk.
QUICK_TEES = frozenset({"cove", "sample"})


@dataclass(frozen=True)
class Claimed:
    """An attestation whose session nonce was spent (:meth:`Broker.begin_attest`), not yet appraised."""

    session_id: str
    tee: str
    runtime: dict[str, Any]
    body: dict[str, Any]

    @property
    def quick(self) -> bool:
        """Its appraisal is short and local (QUICK_TEES): a server may run it on its event loop."""
        return self.tee in QUICK_TEES


@dataclass(frozen=True)
class CertRelease:
    """A ``cert`` release whose checks passed (:meth:`Broker.begin_release`): the certificate, the
    JWE and the audit entry are left to :meth:`Broker.finish_release`, CPU-bound work for a pool
    thread, where nothing runs it twice (only the loop's work runs again when the database is busy,
    and this half issues a certificate before its one write)."""

    path: str
    version: int
    key_pem: bytes
    days: int
    claims: dict[str, Any]
    tee_pubkey: dict[str, Any]
    who: str
    measurement: Any
    via: str


class Broker:
    def __init__(self, settings: Settings, store: Store | None = None):
        self.settings = settings
        self.store = store or Store(settings.db_url, settings.pool_size)
        self.vault = Vault(settings.master_key)
        stored = self.store.set_meta_once("master_key_check", self.vault.check_value())
        self.vault.verify_check_value(stored)
        self.broker_id = self.store.set_meta_once("broker_id", pysecrets.token_hex(16))
        self.audience = f"cove-kbs:{self.broker_id}"
        self.tokens = jose.TokenIssuer(self._token_key(), settings.issuer or self.audience, settings.token_lifetime)
        self.ca_key, self.ca_cert = self._ca()
        self.attestation_policy = (
            policy_mod.load(settings.attestation_policy, "attestation policy", allow_paths=True)
            if settings.attestation_policy
            else policy_mod.default_attestation_policy()
        )
        self.anchors = settings.anchors.with_policy_roots(self.attestation_policy)
        self.collateral = coco_collateral.CollateralSource(
            Path(settings.collateral_dir) if settings.collateral_dir else None, settings.pccs_url
        )
        self._policies: dict[tuple[str, int], policy_mod.Policy] = {}
        self._policy_lock = threading.Lock()
        self._last_purge = 0.0

    # -- the broker's own keys (sealed in the database, shared by every process) --------------
    def _sealed_once(self, name: str, make: Callable[[], bytes]) -> bytes:
        sealed = self.store.broker_key(name)
        if sealed is None:
            sealed = self.store.add_broker_key_once(name, self.vault.seal(f"key:{name}", make()))
        return self.vault.unseal(f"key:{name}", sealed)

    def _token_key(self) -> jwk.Key:
        data = self._sealed_once(
            "token", lambda: json.dumps(jwk.generate_key("EC", "P-256").as_dict(private=True)).encode()
        )
        fields: dict[str, Any] = {str(k): v for k, v in self._sealed_map(data, "token key").map.items()}
        return jwk.import_key(fields, "EC")

    def _ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        def make() -> bytes:
            key = certs.new_key()
            cert = certs.self_signed_ca(key, f"Cove KBS CA {self.broker_id[:8]}")
            return json.dumps({"key": certs.private_key_pem(key).decode(), "cert": certs.pem(cert).decode()}).encode()

        data = self._sealed_map(self._sealed_once("ca", make), "CA")
        key = serialization.load_pem_private_key(data.text("key", max_len=16384).encode(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise Problem("Unavailable", "the broker's stored CA key is not an EC key")
        return key, x509.load_pem_x509_certificate(data.text("cert", max_len=16384).encode())

    @staticmethod
    def _sealed_map(data: bytes, what: str) -> Fields:
        """A JSON object the broker sealed itself (the vault authenticated it); any other shape is Unavailable."""

        def unusable(message: str) -> Problem:
            return Problem("Unavailable", f"the broker's sealed {message}")

        return Fields(decode_json(data, unusable, what), what, unusable)

    def ca_pem(self) -> str:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM).decode()

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.tokens.public]}

    def now(self) -> float:
        return self.settings.clock()

    def evidence_now(self) -> dt.datetime:
        """The time evidence and policies are checked at."""
        if self.settings.evidence_time is not None:
            return self.settings.evidence_time()
        return dt.datetime.fromtimestamp(self.now(), dt.timezone.utc)

    # -- the KBS protocol ----------------------------------------------------------------------------
    def auth(self, request: Any) -> tuple[str, dict[str, Any]]:
        """POST /kbs/v0/auth: a new session and its challenge."""
        if not isinstance(request, dict):
            raise Problem("InvalidRequest", "the auth request must be a JSON object")
        for name in ("version", "tee"):
            if not isinstance(request.get(name), str) or len(request[name]) > 32:
                raise Problem("InvalidRequest", f"{name}: a string of at most 32 characters is required")
        version = request["version"]
        match = _VERSION.match(version)
        if match is None or int(match.group(1)) > 4:
            raise Problem("ProtocolVersion", f"protocol version {version!r} is not supported (0.1.0 .. 0.4.x)")
        tee = coco_evidence.normalize_tee(request.get("tee"))
        extra = request.get("extra-params", {})
        if extra not in ("", None) and not isinstance(extra, dict):
            raise Problem("InvalidRequest", "extra-params must be an object")
        algorithm = coco_binding.select_hash(extra, tee)
        session_id = pysecrets.token_urlsafe(24)
        nonce = base64.b64encode(pysecrets.token_bytes(32)).decode()
        self._maybe_purge()  # first: the session's insert is this call's last write (Store.Busy may retry it)
        self.store.create_session(session_id, nonce, tee, self.settings.challenge_lifetime, self.now())
        return session_id, {"nonce": nonce, "extra-params": {"selected-hash-algorithm": algorithm}}

    def _maybe_purge(self) -> None:
        """Drop sessions a minute past their expiry (at most every 5 s per process)."""
        now = time.monotonic()
        if now - self._last_purge > 5:
            self._last_purge = now
            self.store.purge_sessions(self.now() - 60)

    def _live_session(self, session_id: str | None) -> SessionRow:
        if not session_id:
            raise Problem("SessionNotFound", "no kbs-session-id cookie: POST /kbs/v0/auth first")
        return self._live(self.store.session(session_id))

    def _live(self, row: SessionRow | None) -> SessionRow:
        if row is None:
            raise Problem("SessionNotFound", "the kbs-session-id names no session (unknown or purged)")
        if row.expires_at < self.now():
            raise Problem("SessionExpired", "the session has expired; POST /kbs/v0/auth again")
        return row

    def attest(self, session_id: str | None, body: Any) -> str:
        """POST /kbs/v0/attest: appraise evidence bound to this session's nonce; a token."""
        return self.finish_attest(self.begin_attest(session_id, body))

    def begin_attest(self, session_id: str | None, body: Any) -> Claimed:
        """The first half of :meth:`attest`: check the request and spend the session's nonce.

        Its cost is bounded and small (a few field checks and one database statement); the second
        half, :meth:`finish_attest`, appraises the evidence, whose cost depends on its type
        (:attr:`Claimed.quick`), so a server may run the halves in different places."""
        if not session_id:
            self.store.audit_refusal("session:none", "attest", None, "SessionNotFound: no kbs-session-id cookie")
            raise Problem("SessionNotFound", "no kbs-session-id cookie: POST /kbs/v0/auth first")
        runtime = self._runtime_data(body)
        now = self.now()
        label = f"session:{_label(session_id)}"
        tee = self.store.claim_challenge(session_id, runtime["nonce"], now)
        if tee is None:
            try:
                self._refuse_claim(session_id, runtime["nonce"])
            except Problem as problem:
                self.store.audit_refusal(label, "attest", None, f"{problem.kind}: {problem.detail}")
                raise
        return Claimed(session_id, tee, runtime, body)

    def finish_attest(self, claimed: Claimed) -> str:
        """The second half of :meth:`attest`: appraise the evidence, record the outcome, sign the token."""
        session_id, tee, runtime, body = claimed.session_id, claimed.tee, claimed.runtime, claimed.body
        label = f"session:{_label(session_id)}"
        when = self.evidence_now()
        try:
            evidence, additional = coco_evidence.unpack(tee, body["tee-evidence"], self.collateral)
            coco_evidence.check_additional(additional)
            init_data = coco_evidence.init_data(body.get("init-data"))
            result = coco_evidence.appraise(
                tee, evidence, coco_binding.primary_runtime_data(runtime, additional), self.anchors, when
            )
            bound_claims = coco_evidence.bind_init_data(tee, result, init_data)
            decision = policy_mod.decide(self.attestation_policy, result, when)
            if not decision.allowed:
                raise Problem(
                    "AttestationDeny", f"the broker's attestation policy refuses this evidence: {decision.reason}"
                )
        except Problem as problem:
            self.store.finish_session(
                session_id,
                False,
                None,
                None,
                self.settings.challenge_lifetime,
                self.now(),
                audit=(label, "attest", "denied", None, None, f"{tee}: {problem.kind}: {problem.detail}"),
            )
            raise
        claims = evidence_appraisal.to_claims(result) | bound_claims
        self.store.finish_session(
            session_id,
            True,
            claims,
            runtime["tee-pubkey"],
            self.settings.session_lifetime,
            self.now(),
            audit=(label, "attest", "ok", None, claims.get("measurement"), tee),
        )
        return self.tokens.issue(runtime["tee-pubkey"], claims, decision.reason, self.now())

    @staticmethod
    def _runtime_data(body: Any) -> dict[str, Any]:
        """The attestation's runtime-data, checked before the session's nonce is spent."""
        if not isinstance(body, dict):
            raise Problem("InvalidRequest", "the attestation must be a JSON object")
        runtime = body.get("runtime-data")
        if not isinstance(runtime, dict) or "nonce" not in runtime or "tee-pubkey" not in runtime:
            raise Problem("InvalidRequest", "runtime-data must hold nonce and tee-pubkey")
        if not isinstance(runtime["nonce"], str):
            raise Problem("NonceMismatch", "runtime-data.nonce is not this session's challenge nonce")
        jose.tee_key(runtime["tee-pubkey"])
        if body.get("tee-evidence") is None:
            raise Problem("InvalidRequest", "the attestation lacks tee-evidence")
        if not isinstance(body.get("init-data") or {}, dict):
            raise Problem("InvalidRequest", "init-data must be an object or null")
        return runtime

    def _refuse_claim(self, session_id: str, nonce: str) -> NoReturn:
        """Why a session's nonce could not be consumed: the problem, in the order a client needs it."""
        row = self._live_session(session_id)
        if row.state != "challenged":
            raise Problem("NonceReplayed", "this session's nonce was already used; POST /kbs/v0/auth again")
        if not hmac.compare_digest(nonce.encode(), row.nonce.encode()):
            raise Problem("NonceMismatch", "runtime-data.nonce is not this session's challenge nonce")
        raise Problem("NonceReplayed", "this session's nonce was already used; POST /kbs/v0/auth again")

    def caller(self, session_id: str | None, bearer: str | None) -> Caller:
        """Who is asking: a bearer token of this broker, or an attested cookie session."""
        if bearer:
            claims = self.tokens.verify(bearer, self.now())
            return Caller(claims["tcb-status"], claims["tee-pubkey"], "token")
        if not session_id:
            raise Problem("TokenNotFound", "no kbs-session-id cookie and no bearer token: attest first")
        return self._attested(self._live_session(session_id))

    @staticmethod
    def _attested(row: SessionRow) -> Caller:
        if row.state != "attested" or row.claims is None or row.tee_pubkey is None:
            raise Problem("AttestationError", "this session has not attested successfully")
        return Caller(row.claims, row.tee_pubkey, "cookie", row.id)

    def release_to(
        self, session_id: str | None, bearer: str | None, path: str, version: int | None = None
    ) -> dict[str, Any]:
        """GET /kbs/v0/resource/...: :meth:`begin_release`, then :meth:`finish_release` if it is a cert."""
        step = self.begin_release(session_id, bearer, path, version)
        return step if isinstance(step, dict) else self.finish_release(step)

    def begin_release(
        self, session_id: str | None, bearer: str | None, path: str, version: int | None = None
    ) -> dict[str, Any] | CertRelease:
        """:meth:`caller`, then :meth:`release`'s checks; a cookie session is read together with the
        secret (one database round trip). The JWE, or for a ``cert`` secret what is left to do."""
        try:
            if bearer or not session_id:
                caller = self.caller(session_id, bearer)
            else:
                session, found = self.store.session_and_release_row(session_id, path, version)
                caller = self._attested(self._live(session))
        except Problem as problem:
            who = "token" if bearer else f"session:{_label(session_id)}" if session_id else "anonymous"
            self.store.audit_refusal(who, "release", path[:400], f"{problem.kind}: {problem.detail}")
            raise
        secrets_mod.split_path(path)
        if bearer or not session_id:
            found = self.store.release_row(path, version)
        return self._release(path, caller, version, found)

    def _policy(self, name: str, found: tuple[str, int] | None = None) -> policy_mod.Policy | None:
        """The parsed policy (cached by name and version); found: its (body, version) if already read."""
        found = found or self.store.policy(name)
        if found is None:
            return None
        body, version = found
        with self._policy_lock:
            cached = self._policies.get((name, version))
            if cached is None:
                cached = policy_mod.load(body, f"policy {name}")
                if len(self._policies) > 1000:
                    self._policies.clear()
                self._policies[(name, version)] = cached
        return cached

    def release(self, path: str, caller: Caller, version: int | None = None) -> dict[str, Any]:
        """GET /kbs/v0/resource/...: the secret as a JWE to the caller's TEE key, if policy allows."""
        secrets_mod.split_path(path)
        step = self._release(path, caller, version, self.store.release_row(path, version))
        return step if isinstance(step, dict) else self.finish_release(step)

    def _release(
        self, path: str, caller: Caller, version: int | None, found: ReleaseRow | None
    ) -> dict[str, Any] | CertRelease:
        who = f"{caller.claims.get('tee')}:{_label(caller.session) if caller.session else 'token'}"
        measurement = caller.claims.get("measurement")
        if found is None:
            self.store.audit(who, "release", "not-found", path, measurement)
            raise Problem("InvalidRequestPath", f"no resource {path}")
        row, policy_text, sealed = found
        policy = self._policy(row.policy, policy_text) if policy_text is not None else None
        if policy is None:
            decision = policy_mod.Decision(False, f"its release policy {row.policy!r} does not exist")
        else:
            try:
                claimed = evidence_appraisal.from_claims(caller.claims)
            except (TypeError, ValueError, KeyError):
                raise Problem("TokenVerifierError", "the attestation claims are malformed") from None
            decision = policy_mod.decide(policy, claimed, self.evidence_now())
        if not decision.allowed:
            self.store.audit(who, "release", "denied", path, measurement, decision.reason)
            raise Problem("PolicyDeny", f"{path}: {decision.reason}")
        wanted = version or row.current_version
        if sealed is None:
            raise Problem("InvalidRequestPath", f"{row.path} has no version {wanted}")
        value = self.vault.unseal(f"secret:{row.path}@{wanted}", sealed)
        if row.kind == "cert":
            days = row.params.get("days", 30)
            return CertRelease(
                path, wanted, value, days, caller.claims, caller.tee_pubkey, who, measurement, caller.via
            )
        return self._deliver(caller.tee_pubkey, value, who, f"{path}@{wanted}", measurement, caller.via)

    def finish_release(self, step: CertRelease) -> dict[str, Any]:
        """A cert release's certificate (issued once: call it where a Busy does not run it again), its
        JWE and its audit entry."""
        value = secrets_mod.issue_certificate(
            step.key_pem, self.ca_key, self.ca_cert, step.claims, step.path, step.days, version=step.version
        )
        return self._deliver(
            step.tee_pubkey, value, step.who, f"{step.path}@{step.version}", step.measurement, step.via
        )

    def _deliver(
        self, tee_pubkey: dict[str, Any], value: bytes, who: str, target: str, measurement: Any, via: str
    ) -> dict[str, Any]:
        """The JWE of value to the TEE key, audited; a TEE key that cannot receive it (one accepted by
        an older broker, in a token) is an audited 4xx refusal, never a 500."""
        try:
            document = jose.encrypt_to(tee_pubkey, value)
        except (Problem, ValueError, TypeError) as exc:
            detail = exc.detail if isinstance(exc, Problem) else f"{type(exc).__name__}: {exc}"
            self.store.audit(who, "release", "refused", target, measurement, f"tee-pubkey: {detail}"[:400])
            raise Problem("InvalidRequest", f"the TEE key cannot receive the resource: {detail}") from None
        self.store.audit(who, "release", "ok", target, measurement, via)
        return document

    def _value(self, row: SecretRow, version: int) -> bytes:
        sealed = self.store.sealed_version(row.path, version)
        if sealed is None:
            raise Problem("InvalidRequestPath", f"{row.path} has no version {version}")
        return self.vault.unseal(f"secret:{row.path}@{version}", sealed)

    # -- administration ----------------------------------------------------------------------------
    def admin(self, bearer: str | None, action: str) -> str:
        """The name of the admin key behind bearer, if its role allows action; a 401/403 otherwise."""
        return self.authorize_admin(self.authenticate_admin(bearer), action)

    def authenticate_admin(self, bearer: str | None) -> tuple[str, str]:
        """(name, role) of the admin key that signed bearer, a token used once only; a 401 otherwise.

        Every refusal is audited (identical floods are counted, see Store.audit_refusal). The token's
        ``jti`` is recorded in the database until the token expires, so a token is accepted once by
        all brokers sharing the database.
        """
        name = None
        try:
            if not bearer:
                raise Problem("AdminAuth", "no admin key: send a signed admin token as the bearer")
            name = jose.admin_key_name(bearer)
            found = self.store.admin_key(name)
            if found is None:
                raise Problem("AdminAuth", f"admin key {name!r} is not registered with this broker")
            public, role = found
            claims = jose.verify_admin_token(bearer, public, self.audience, time.time())
            jti = claims.get("jti")
            if not isinstance(jti, str) or not 8 <= len(jti) <= 128:
                raise Problem("AdminAuth", "the admin token lacks a jti of 8 to 128 characters")
            if not self.store.use_token_id(f"{name}:{jti}", float(claims["exp"]), time.time()):
                raise Problem("AdminAuth", "the admin token was already used; sign a fresh one per request")
        except Problem as problem:
            self.store.audit_refusal(f"admin:{name[:64] if name else '?'}", "admin.auth", None, problem.detail)
            raise
        return name, role

    def authorize_admin(self, who: tuple[str, str], action: str) -> str:
        """The admin key's name if its role allows action; a 403 (audited) otherwise."""
        name, role = who
        if action in WRITE_ACTIONS and role != "admin":
            self.store.audit(f"admin:{name}", action, "forbidden", None, None, f"role {role}")
            raise Problem("AdminForbidden", f"admin key {name!r} has role {role}, which may not {action}")
        return name

    def bootstrap_admin(self, name: str, public: dict[str, Any], role: str = "admin") -> bool:
        """Register an admin key directly in the database (`cove kbs init`)."""
        self._check_key(name, public, role)
        added = self.store.add_admin_key(name, public, role)
        if added:
            self.store.audit("local:init", "key.add", "ok", name, None, role)
        return added

    @staticmethod
    def _check_key(name: str, public: dict[str, Any], role: str) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise Problem("InvalidRequest", f"admin key name {name!r} must be 1-64 letters, digits, '.', '_', '-'")
        if role not in ROLES:
            raise Problem("InvalidRequest", f"role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(public, dict) or any(k in public for k in ("d", "p", "q")):
            raise Problem("InvalidRequest", "give the admin key's public JWK only")
        try:
            key = jwk.import_key(public, public.get("kty"))
            usable = bool(jose.admin_alg(key))
        except _JWK_ERRORS as exc:  # joserfc's own, and its key parsers' (base64, missing or mistyped members)
            raise Problem("InvalidRequest", f"not an Ed25519 or EC P-256/P-384 public JWK: {exc}") from None
        if not usable:  # an EC key on another curve imports, but admins sign only with these
            raise Problem("InvalidRequest", "not an Ed25519 or EC P-256/P-384 public JWK: another curve")

    def add_admin_key(self, actor: str, name: str, public: dict[str, Any], role: str) -> None:
        self._check_key(name, public, role)
        if not self.store.add_admin_key(name, public, role):
            raise Problem("Conflict", f"admin key {name!r} exists")
        self.store.audit(f"admin:{actor}", "key.add", "ok", name, None, role)

    def delete_admin_key(self, actor: str, name: str) -> None:
        if name == actor:
            raise Problem("InvalidRequest", "an admin key cannot delete itself")
        if not self.store.delete_admin_key(name):
            raise Problem("NotFound", f"no admin key {name!r}")
        self.store.audit(f"admin:{actor}", "key.delete", "ok", name)

    def put_policy(self, actor: str, name: str, body: str) -> int:
        if not isinstance(name, str) or not _NAME.match(name):
            raise Problem("InvalidRequest", f"policy name {name!r} must be 1-64 letters, digits, '.', '_', '-'")
        if not isinstance(body, str) or len(body) > 65536:
            raise Problem("InvalidRequest", "a policy is a text of at most 64 KiB")
        policy_mod.load(body, f"policy {name}")
        version = self.store.put_policy(name, body)
        self.store.audit(f"admin:{actor}", "policy.put", "ok", name, None, f"version {version}")
        return version

    def delete_policy(self, actor: str, name: str) -> None:
        users = self.store.policy_in_use(name)
        if users:
            raise Problem("Conflict", f"policy {name!r} is used by {', '.join(users[:5])}")
        if not self.store.delete_policy(name):
            raise Problem("NotFound", f"no policy {name!r}")
        self.store.audit(f"admin:{actor}", "policy.delete", "ok", name)

    def get_policy(self, name: str) -> dict[str, Any]:
        found = self.store.policy(name)
        if found is None:
            raise Problem("NotFound", f"no policy {name!r}")
        return {"name": name, "body": found[0], "version": found[1]}

    def create_secret(
        self,
        actor: str,
        path: str,
        kind: str,
        policy: str,
        exportable: bool,
        params: dict[str, Any] | None = None,
        value: bytes | None = None,
    ) -> dict[str, Any]:
        secrets_mod.split_path(path)
        params = secrets_mod.check_params(kind, params or {})
        if self.store.policy(policy) is None:
            raise Problem("NotFound", f"no policy {policy!r}: create it first (cove kbs admin policy put)")
        if value is None:
            material = secrets_mod.generate(kind, params)
        else:
            material = secrets_mod.from_upload(kind, value)
        now = time.time()
        row = SecretRow(path, kind, params, policy, bool(exportable), 1, material.public, now, now)
        if not self.store.create_secret(row, self.vault.seal(f"secret:{path}@1", material.value), actor):
            raise Problem("Conflict", f"secret {path} exists; rotate it or delete it first")
        self.store.audit(
            f"admin:{actor}",
            "secret.create",
            "ok",
            path,
            None,
            f"{kind} {'uploaded' if value is not None else 'generated'}; policy {policy}; "
            f"{'exportable' if exportable else 'never exported'}",
        )
        return self.describe(path)

    def rotate_secret(self, actor: str, path: str, value: bytes | None = None) -> dict[str, Any]:
        row = self._secret_row(path)
        material = (
            secrets_mod.generate(row.kind, row.params) if value is None else secrets_mod.from_upload(row.kind, value)
        )
        if value is None and row.kind == "data":
            raise Problem("InvalidRequest", f"{path} holds uploaded data: give the new value")
        version = row.current_version + 1
        if not self.store.add_version(
            path, version, self.vault.seal(f"secret:{path}@{version}", material.value), material.public, actor
        ):
            raise Problem("Conflict", f"{path} was rotated concurrently; try again")
        self.store.audit(f"admin:{actor}", "secret.rotate", "ok", f"{path}@{version}")
        return self.describe(path)

    def set_secret_policy(self, actor: str, path: str, policy: str) -> dict[str, Any]:
        self._secret_row(path)
        if self.store.policy(policy) is None:
            raise Problem("NotFound", f"no policy {policy!r}")
        self.store.set_secret_policy(path, policy)
        self.store.audit(f"admin:{actor}", "secret.policy", "ok", path, None, policy)
        return self.describe(path)

    def delete_secret(self, actor: str, path: str) -> None:
        self._secret_row(path)
        self.store.delete_secret(path)
        self.store.audit(f"admin:{actor}", "secret.delete", "ok", path)

    def _secret_row(self, path: str) -> SecretRow:
        secrets_mod.split_path(path)
        row = self.store.secret(path)
        if row is None:
            raise Problem("NotFound", f"no secret {path}")
        return row

    def describe(self, path: str) -> dict[str, Any]:
        row = self._secret_row(path)
        return {
            "path": row.path,
            "kind": row.kind,
            "params": row.params,
            "policy": row.policy,
            "exportable": row.exportable,
            "version": row.current_version,
            "public": row.public,
            "versions": self.store.versions(path),
            "created_at": row.created_at,
            "updated_at": row.updated_at,
        }

    def list_secrets(self) -> list[dict[str, Any]]:
        return [
            {
                "path": r.path,
                "kind": r.kind,
                "policy": r.policy,
                "exportable": r.exportable,
                "version": r.current_version,
            }
            for r in self.store.secrets()
        ]

    def export_secret(self, actor: str, path: str, version: int | None = None) -> bytes:
        row = self._secret_row(path)
        if not row.exportable:
            self.store.audit(f"admin:{actor}", "secret.export", "refused", path, None, "never exported")
            raise Problem("NotExportable", f"{path} is marked never exportable: only attested enclaves receive it")
        value = self._value(row, version or row.current_version)
        self.store.audit(f"admin:{actor}", "secret.export", "ok", f"{path}@{version or row.current_version}")
        return value
