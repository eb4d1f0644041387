"""The KBS client: attest, then fetch resources; usable inside an enclave.

    from cove.kbs.client import KbsClient, DevAttestation
    client = KbsClient("https://kbs.example:8443", ca_cert="/etc/kbs-ca.pem")
    client.attest(DevAttestation())          # /dev/attestation inside a Cove enclave
    password = client.resource("prod/db/password")

A broker that runs in an enclave (``cove kbs serve --ra-tls``) is verified by
its evidence instead: ``KbsClient(url, broker_policy="broker-policy.toml")``.

The client makes an ephemeral TEE key (EC P-256 by default, RSA 3072 on
request) for each attestation; its private half never leaves the process. A
response that does not decrypt under it (tampered, or meant for another key)
is refused. Admin operations: :class:`AdminClient`.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx
from joserfc import jwk

from cove.decode import Fields, decode_json
from cove.errors import CoveError, ExitCode
from cove.kbs import evidence_appraisal, jose
from cove.kbs.problems import kind_of

if TYPE_CHECKING:
    import ssl

    from cove.attest.policy import Policy

PROTOCOL_VERSION = "0.1.1"
MAX_KEY_FILE = 1 << 16  # an admin key file: a name, a URL and one JWK


class KbsError(CoveError):
    """The broker refused, or could not be reached; ``kind`` names the problem type."""

    exit_code = ExitCode.REFUSED

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        kind: str | None = None,
        status: int | None = None,
        code: ExitCode | None = None,
    ):
        super().__init__(message, hint)
        self.kind = kind
        self.status = status
        if code is not None:  # unreachable, or a missing or bad local file: not a refusal
            self.exit_code = code


class EvidenceProvider(Protocol):
    tee: str

    def evidence(self, report_data: bytes) -> dict[str, Any]:
        """tee-evidence binding report_data (64 bytes)."""


@dataclass
class SampleEvidence:
    """Unsigned `sample` evidence, for protocol tests; brokers refuse it by default."""

    tee: str = "sample"
    claims: dict[str, Any] = field(default_factory=lambda: {"svn": 1, "debug": False})

    def evidence(self, report_data: bytes) -> dict[str, Any]:
        return dict(self.claims, report_data=base64.b64encode(report_data).decode())


@dataclass
class DevAttestation:
    """Cove evidence from /dev/attestation (inside a Cove enclave)."""

    root: Path = Path("/dev/attestation")
    tee: str = "cove"

    def evidence(self, report_data: bytes) -> dict[str, Any]:
        try:
            (self.root / "user_report_data").write_bytes(report_data)
            quote = (self.root / "quote").read_bytes()
        except OSError as exc:
            raise KbsError(
                f"cannot get evidence from {self.root}: {exc.strerror}",
                "run inside a Cove enclave (cove run), or give evidence another way",
            ) from None
        return {"evidence": base64.b64encode(quote).decode()}


def _verify_option(
    ca_cert: str | Path | bool | None, broker_policy: Policy | Path | str | None = None
) -> ssl.SSLContext | bool:
    """What httpx verifies the broker with: system CAs, a pinned CA, or (RA-TLS) a policy on its evidence."""
    if broker_policy is not None:
        if ca_cert is not None:
            raise KbsError("give the broker's CA certificate or its RA-TLS policy, not both")
        from cove.attest.errors import VerificationError
        from cove.kbs import broker_ratls

        try:
            return broker_ratls.client_context(broker_policy)
        except (CoveError, VerificationError) as exc:
            raise KbsError(f"broker policy: {exc.line()}", exc.hint) from None
    if ca_cert is None or ca_cert is True:
        return True
    if ca_cert is False:
        return False
    import ssl

    path = Path(ca_cert)
    if not path.is_file():
        raise KbsError(
            f"CA certificate {path} not found", "pass the broker's TLS CA certificate (PEM)", code=ExitCode.NOT_FOUND
        )
    try:
        return ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise KbsError(
            f"CA certificate {path} is not a PEM certificate: {exc}",
            "pass the broker's TLS CA certificate (PEM)",
            code=ExitCode.USAGE,
        ) from None


def _unreachable(exc: httpx.HTTPError, what: str, url: str) -> KbsError:
    """A transport error as one line: an RA-TLS refusal (never retried) or an unreachable broker."""
    from cove.kbs.broker_ratls import rejection

    refused = rejection(exc)
    if refused is not None:
        return KbsError(
            f"{what}: the broker at {url} failed RA-TLS verification: {refused}",
            "the broker is not the enclave the policy names (or not in an enclave at all)",
            kind="RaTlsRejected",
        )
    return KbsError(
        f"{what}: cannot reach the broker at {url}: {exc}",
        "check the URL, that the broker runs, and its CA certificate or policy",
        code=ExitCode.UNREACHABLE,
    )


def _http(
    url: str,
    ca_cert: str | Path | bool | None,
    broker_policy: Policy | Path | str | None,
    timeout: float,
    transport: httpx.BaseTransport | None = None,
) -> httpx.Client:
    if broker_policy is not None and not url.startswith("https://"):
        raise KbsError(f"{url}: an RA-TLS broker policy needs an https:// URL")
    # With a policy, no proxy from the environment: the evidence check runs on a direct TLS socket.
    return httpx.Client(
        base_url=url,
        verify=_verify_option(ca_cert, broker_policy),
        timeout=timeout,
        transport=transport,
        trust_env=broker_policy is None,
    )


def _raise_for(response: httpx.Response, what: str) -> None:
    if response.status_code < 400:
        return
    try:
        document = response.json()
    except ValueError:
        document = {}
    kind = kind_of(document)
    detail = document.get("detail") if isinstance(document, dict) else None
    raise KbsError(
        f"{what}: the broker refused ({response.status_code} {kind or 'error'}): {detail or response.text[:200]}",
        kind=kind,
        status=response.status_code,
    )


class KbsClient:
    """``ca_cert``: the broker's TLS CA; or ``broker_policy`` (a Policy, path or inline text): an RA-TLS broker."""

    def __init__(
        self,
        url: str,
        ca_cert: str | Path | bool | None = None,
        timeout: float = 30.0,
        key_type: str = "EC",
        transport: httpx.BaseTransport | None = None,
        broker_policy: Policy | Path | str | None = None,
    ):
        self.url = url.rstrip("/")
        self.key_type = key_type
        self.http = _http(self.url, ca_cert, broker_policy, timeout, transport)
        self.tee_key: jwk.Key | None = None
        self.token: str | None = None
        self.claims: dict[str, Any] | None = None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> KbsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post(self, path: str, body: dict[str, Any], what: str) -> httpx.Response:
        try:
            response = self.http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise _unreachable(exc, what, self.url) from None
        _raise_for(response, what)
        return response

    def challenge(self, tee: str) -> str:
        """POST /kbs/v0/auth; the nonce (the session cookie is kept)."""
        self.http.cookies.clear()
        response = self._post("/kbs/v0/auth", {"version": PROTOCOL_VERSION, "tee": tee, "extra-params": {}}, "auth")
        nonce: str = response.json()["nonce"]
        return nonce

    def attest(self, provider: EvidenceProvider) -> str:
        """Run auth and attest; returns the attestation token (also kept for bearer use)."""
        nonce = self.challenge(provider.tee)
        self.tee_key = key = jose.new_tee_key(self.key_type)
        runtime_data = {"nonce": nonce, "tee-pubkey": jose.public_jwk(key)}
        evidence = provider.evidence(evidence_appraisal.expected_report_data(runtime_data))
        response = self._post("/kbs/v0/attest", {"runtime-data": runtime_data, "tee-evidence": evidence}, "attest")
        self.token = response.json()["token"]
        self.claims = _token_claims(self.token)
        return self.token

    def resource_document(self, path: str, version: int | None = None, bearer: bool = False) -> dict[str, Any]:
        """The raw JWE for a resource (tests use it to tamper)."""
        path = path.strip("/")
        headers = {"Authorization": f"Bearer {self.token}"} if bearer and self.token else {}
        params = {"version": version} if version else None
        try:
            request = self.http.build_request("GET", f"/kbs/v0/resource/{path}", headers=headers, params=params)
            if bearer:
                request.headers.pop("cookie", None)  # the token alone must do
            response = self.http.send(request)
        except httpx.HTTPError as exc:
            raise _unreachable(exc, f"resource {path}", self.url) from None
        _raise_for(response, f"resource {path}")
        document: dict[str, Any] = response.json()
        return document

    def open(self, document: dict[str, Any]) -> bytes:
        if self.tee_key is None:
            raise KbsError("no TEE key: attest first")
        try:
            return jose.decrypt_from(document, self.tee_key)
        except ValueError as exc:
            raise KbsError(
                f"the broker's response does not decrypt with this TEE's key: {exc}",
                "the response was tampered with or was meant for another TEE",
            ) from None

    def resource(self, path: str, version: int | None = None, bearer: bool = False) -> bytes:
        """GET /kbs/v0/resource/PATH, decrypted with this attestation's TEE key."""
        return self.open(self.resource_document(path, version, bearer))


def _token_claims(token: str) -> dict[str, Any]:
    try:
        body = token.split(".")[1]
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (IndexError, ValueError):
        raise KbsError("the broker's attestation token is not a JWT") from None
    claims = Fields(decode_json(raw, _not_jwt, "its claims"), "its claims", _not_jwt).map
    return {str(key): value for key, value in claims.items()}


def _not_jwt(message: str) -> KbsError:
    return KbsError(f"the broker's attestation token is not a JWT: {message}")


def fetch(
    url: str,
    paths: list[str],
    provider: EvidenceProvider,
    ca_cert: str | Path | bool | None = None,
    retries: int = 0,
    backoff: float = 0.2,
    timeout: float = 30.0,
    broker_policy: Policy | Path | str | None = None,
) -> dict[str, bytes]:
    """Attest once and fetch several resources; transport failures are retried (not refusals)."""
    attempt = 0
    while True:
        try:
            with KbsClient(url, ca_cert, timeout=timeout, broker_policy=broker_policy) as client:
                client.attest(provider)
                return {path: client.resource(path) for path in paths}
        except KbsError as exc:
            if exc.status is not None or exc.kind == "RaTlsRejected" or attempt >= retries:
                raise
            attempt += 1
            time.sleep(backoff * attempt)


# -- administration --------------------------------------------------------------------------------
class AdminClient:
    """Signs a fresh admin token for each request with a registered admin key."""

    def __init__(
        self,
        url: str,
        key: jwk.Key,
        key_name: str,
        ca_cert: str | Path | bool | None = None,
        audience: str | None = None,
        timeout: float = 30.0,
        broker_policy: Policy | Path | str | None = None,
    ):
        self.url = url.rstrip("/")
        self.key = key
        self.key_name = key_name
        self.http = _http(self.url, ca_cert, broker_policy, timeout)
        self.audience = audience

    @classmethod
    def from_file(
        cls,
        url: str,
        key_file: Path,
        ca_cert: str | Path | bool | None = None,
        broker_policy: Policy | Path | str | None = None,
    ) -> AdminClient:
        """An admin client from a key file written by `cove kbs init` (JSON: name, audience, url, jwk)."""

        def not_a_key(reason: str) -> KbsError:
            return KbsError(f"admin key file {key_file} is not a Cove admin key: {reason}", code=ExitCode.USAGE)

        try:
            raw = Path(key_file).read_bytes()
        except FileNotFoundError:
            raise KbsError(
                f"admin key file {key_file} not found", "create one with `cove kbs init`", code=ExitCode.NOT_FOUND
            ) from None
        except OSError as exc:
            raise not_a_key(exc.strerror or str(exc)) from None
        f = Fields(
            decode_json(raw, not_a_key, "it", limit=MAX_KEY_FILE),
            "the file",
            not_a_key,
            ("name", "audience", "url", "jwk"),
        )
        name = f.text("name", max_len=256)
        audience = f.value("audience", (str, type(None)), None)
        f.value("url", (str, type(None)), None)
        try:
            key = jose.load_private_jwk(json.dumps(f.value("jwk", dict)))
        except ValueError as exc:
            raise not_a_key(str(exc)) from None
        return cls(
            url, key, name, ca_cert, audience if isinstance(audience, str) else None, broker_policy=broker_policy
        )

    def close(self) -> None:
        self.http.close()

    def _headers(self) -> dict[str, Any]:
        if self.audience is None:
            raise KbsError("the admin key file names no broker (audience)")
        return {"Authorization": "Bearer " + jose.make_admin_token(self.key, self.key_name, self.audience)}

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, params: dict[str, Any] | None = None
    ) -> Any:
        try:
            response = self.http.request(method, path, json=body, params=params, headers=self._headers())
        except httpx.HTTPError as exc:
            raise _unreachable(exc, f"{method} {path}", self.url) from None
        _raise_for(response, f"{method} {path}")
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def _object(
        self, method: str, path: str, body: dict[str, Any] | None = None, params: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        found: dict[str, Any] = self.request(method, path, body, params)
        return found

    def _list(self, method: str, path: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.request(method, path, None, params)
        return found

    def create_secret(
        self,
        path: str,
        kind: str,
        policy: str,
        exportable: bool = True,
        params: dict[str, Any] | None = None,
        value: bytes | None = None,
    ) -> dict[str, Any]:
        body = {"path": path, "kind": kind, "policy": policy, "exportable": exportable, "params": params or {}}
        if value is not None:
            body["value"] = base64.b64encode(value).decode()
        return self._object("POST", "/kbs/v0/admin/secrets", body)

    def rotate_secret(self, path: str, value: bytes | None = None) -> dict[str, Any]:
        body = {"value": base64.b64encode(value).decode()} if value is not None else {}
        return self._object("POST", f"/kbs/v0/admin/secrets/{path}/rotate", body)

    def set_secret_policy(self, path: str, policy: str) -> dict[str, Any]:
        return self._object("PUT", f"/kbs/v0/admin/secrets/{path}/policy", {"policy": policy})

    def delete_secret(self, path: str) -> None:
        self.request("DELETE", f"/kbs/v0/admin/secrets/{path}")

    def secrets(self) -> list[dict[str, Any]]:
        return self._list("GET", "/kbs/v0/admin/secrets")

    def secret(self, path: str) -> dict[str, Any]:
        return self._object("GET", f"/kbs/v0/admin/secrets/{path}")

    def export(self, path: str, version: int | None = None) -> bytes:
        result = self.request(
            "GET", f"/kbs/v0/admin/secrets/{path}/value", params={"version": version} if version else None
        )
        return base64.b64decode(result["value"])

    def put_policy(self, name: str, body: str) -> dict[str, Any]:
        return self._object("PUT", f"/kbs/v0/admin/policies/{name}", {"body": body})

    def policy(self, name: str) -> dict[str, Any]:
        return self._object("GET", f"/kbs/v0/admin/policies/{name}")

    def policies(self) -> list[dict[str, Any]]:
        return self._list("GET", "/kbs/v0/admin/policies")

    def delete_policy(self, name: str) -> None:
        self.request("DELETE", f"/kbs/v0/admin/policies/{name}")

    def audit(self, after: int = 0, limit: int = 100, action: str | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"after": after, "limit": limit}
        if action:
            params["action"] = action
        return self._list("GET", "/kbs/v0/admin/audit", params)

    def add_key(self, name: str, public_jwk: dict[str, Any], role: str) -> dict[str, Any]:
        return self._object("POST", "/kbs/v0/admin/keys", {"name": name, "jwk": public_jwk, "role": role})

    def keys(self) -> list[dict[str, Any]]:
        return self._list("GET", "/kbs/v0/admin/keys")

    def delete_key(self, name: str) -> None:
        self.request("DELETE", f"/kbs/v0/admin/keys/{name}")
