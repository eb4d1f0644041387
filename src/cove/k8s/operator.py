"""The operator (kopf): KeyBroker, EnclavePolicy and EnclaveSecret, synced into the key broker.

``cove k8s operator`` runs this module's handlers. A KeyBroker either names an
existing broker (``spec.external.url``) or is run here as a Deployment of
``cove kbs serve`` on the PostgreSQL its database Secret names, with a
Service; EnclavePolicy and EnclaveSecret objects are written into their broker
through its admin API (cove.kbs.client.AdminClient) with the admin key from
the KeyBroker's admin Secret. Every handler compares what the broker holds
with what the object asks for and changes only the difference, so a repeated
or resumed reconcile is a no-op. Failures land in ``status`` (phase Error, a
one-line message, the retry count) and are retried with exponential back-off
up to five minutes; finalizers remove policies and secrets from the broker.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import httpx
import kopf

from cove.decode import Fields, decode_json
from cove.k8s.crds import GROUP, VERSION
from cove.k8s.kubeapi import API_ENV, Api, MissingKey, Unconfigured

if TYPE_CHECKING:
    from cove.kbs.client import AdminClient

IMAGE_ENV = "COVE_KBS_IMAGE"
DEFAULT_IMAGE = "cove/kbs:0.1.0"
MAX_DELAY = 300
ADMIN_KEY_LIMIT = 65536  # an admin key file is a name, a URL and one JWK
FINALIZER = f"operator.{GROUP}/cleanup"
# A Secret may be copied into a broker only if this annotation names the importing
# EnclaveSecret (names separated by commas): creating an EnclaveSecret must not let
# anyone read a Secret with the operator's rights.
IMPORTABLE_BY = f"{GROUP}/importable-by"
# The owner marker: the first line of every policy the operator writes into a broker.
OWNER_MARK = f"# {GROUP}/owner: "
# An EnclaveSecret's owner marker is a policy of its own (the broker keeps no metadata
# with a secret): this prefix and a hash of the path; it releases nothing.
SECRET_MARKER_PREFIX = "cove-owner."
MARKER_BODY = "types = []\n"  # no evidence type is acceptable: never attached to a secret anyway

log = logging.getLogger("cove.k8s.operator")


def backoff(retry: int) -> float:
    """Seconds before retry number RETRY: 1, 2, 4, ... capped at five minutes."""
    return float(min(2 ** min(retry, 16), MAX_DELAY))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class Failure(Exception):
    """A reconcile failure with the one line that goes into status.message."""


_api: Api | None = None


def api() -> Api:
    global _api
    if _api is None:
        try:
            _api = Api()
        except Unconfigured as exc:
            raise kopf.PermanentError(str(exc)) from None
    return _api


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _api
    _api = None  # credentials are read again at each start
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=f"operator.{GROUP}")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=f"operator.{GROUP}", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 60
    settings.networking.request_timeout = 30


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    server = os.environ.get(API_ENV)
    if server:
        return kopf.ConnectionInfo(server=server, insecure=True)
    return kopf.login_with_service_account(**kwargs)


def _fail(patch: kopf.Patch, retry: int, message: str) -> None:
    """Record the failure in status and ask kopf to try again later."""
    patch.status["phase"] = "Error"
    patch.status["message"] = message
    patch.status["retries"] = retry + 1
    delay = backoff(retry)
    log.warning("%s (retry %d in %.0fs)", message, retry + 1, delay)
    raise kopf.TemporaryError(message, delay=delay)


def _ready(patch: kopf.Patch, generation: int | None, **fields: object) -> None:
    patch.status.update(
        {"phase": "Ready", "message": "", "retries": 0, "lastSync": _now(), "observedGeneration": generation, **fields}
    )


# -- KeyBroker -------------------------------------------------------------------------------------
def _broker_objects(name: str, namespace: str, spec: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    labels = {
        "app.kubernetes.io/name": "cove-kbs",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "cove-operator",
    }
    port = int(spec.get("port", 8443))
    database, master, tls = spec["database"], spec["masterKey"], spec["tls"]
    args = [
        "kbs",
        "serve",
        "--listen",
        f"0.0.0.0:{port}",
        "--db",
        "$(COVE_KBS_DB)",
        "--master-key-file",
        "/var/run/cove-kbs/master/master.key",
        "--cert",
        "/var/run/cove-kbs/tls/tls.crt",
        "--key",
        "/var/run/cove-kbs/tls/tls.key",
    ]
    if spec.get("policy"):
        args += ["--policy", "/var/run/cove-kbs/policy/policy.toml"]
    volumes: list[dict[str, Any]] = [
        {
            "name": "master",
            "secret": {
                "secretName": master["name"],
                "items": [{"key": master.get("key", "master.key"), "path": "master.key"}],
            },
        },
        {"name": "tls", "secret": {"secretName": tls["name"]}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "master", "mountPath": "/var/run/cove-kbs/master", "readOnly": True},
        {"name": "tls", "mountPath": "/var/run/cove-kbs/tls", "readOnly": True},
    ]
    deployment: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": int(spec.get("replicas", 2)),
            "selector": {"matchLabels": {"app.kubernetes.io/instance": name, "app.kubernetes.io/name": "cove-kbs"}},
            # Rolling upgrades: a new pod is ready before an old one goes; brokers share the database.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 65532,
                        "runAsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "kbs",
                            "image": spec.get("image") or os.environ.get(IMAGE_ENV, DEFAULT_IMAGE),
                            "args": args,
                            "env": [
                                {
                                    "name": "COVE_KBS_DB",
                                    "valueFrom": {
                                        "secretKeyRef": {"name": database["name"], "key": database.get("key", "url")}
                                    },
                                }
                            ],
                            "ports": [{"name": "https", "containerPort": port}],
                            "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 5},
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": mounts,
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }
    if spec.get("policy"):
        # The policy travels as a ConfigMap the operator owns too.
        volumes.append({"name": "policy", "configMap": {"name": f"{name}-policy"}})
        mounts.append({"name": "policy", "mountPath": "/var/run/cove-kbs/policy", "readOnly": True})
    service: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            # The broker's /metrics (cove_kbs_requests_total), for Prometheus' usual relabelling.
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/scheme": "https",
                "prometheus.io/port": str(port),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": {
            "selector": {"app.kubernetes.io/instance": name, "app.kubernetes.io/name": "cove-kbs"},
            "ports": [{"name": "https", "port": port, "targetPort": port}],
        },
    }
    return deployment, service


@kopf.on.resume(GROUP, VERSION, "keybrokers")
@kopf.on.create(GROUP, VERSION, "keybrokers")
@kopf.on.update(GROUP, VERSION, "keybrokers")
def key_broker(
    spec: kopf.Spec,
    name: str,
    namespace: str | None,
    body: kopf.Body,
    patch: kopf.Patch,
    retry: int,
    meta: kopf.Meta,
    **_: Any,
) -> None:
    where = _namespaced(namespace)
    generation = meta.get("generation")
    if spec.get("external"):
        _ready(patch, generation, url=spec["external"]["url"])
        return
    if not all(spec.get(k) for k in ("database", "masterKey", "tls")):
        raise kopf.PermanentError("a KeyBroker needs spec.external, or spec.database, spec.masterKey and spec.tls")
    k8s = api()
    try:
        for what, ref, default in (
            ("database", spec["database"], "url"),
            ("master key", spec["masterKey"], "master.key"),
        ):
            if k8s.secret_value(where, ref["name"], ref.get("key", default)) is None:
                raise Failure(f"{what} Secret {ref['name']!r} not found in {where}")
        deployment, service = _broker_objects(name, where, spec)
        kopf.adopt([deployment, service], owner=body)
        if spec.get("policy"):
            config_map = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": f"{name}-policy", "namespace": where},
                "data": {"policy.toml": spec["policy"]},
            }
            kopf.adopt(config_map, owner=body)
            k8s.apply(f"/api/v1/namespaces/{where}/configmaps", config_map)
        k8s.apply(f"/apis/apps/v1/namespaces/{where}/deployments", deployment)
        k8s.apply(f"/api/v1/namespaces/{where}/services", service)
    except (Failure, MissingKey) as exc:
        _fail(patch, retry, str(exc))
    except httpx.HTTPError as exc:
        _fail(patch, retry, f"the Kubernetes API failed: {exc}")
    port = int(spec.get("port", 8443))
    _ready(patch, generation, url=f"https://{name}.{where}.svc:{port}")


# -- the broker's admin API ------------------------------------------------------------------------
class Broker:
    """An AdminClient for the KeyBroker named BROKER in NAMESPACE, from its objects and Secrets."""

    def __init__(self, namespace: str, broker: str) -> None:
        from cove.kbs import jose
        from cove.kbs.client import AdminClient

        k8s = api()
        obj = k8s.get(f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/keybrokers/{broker}")
        if obj is None:
            raise Failure(f"KeyBroker {broker!r} not found in {namespace}")
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        url = (spec.get("external") or {}).get("url") or status.get("url")
        if not url:
            raise Failure(f"KeyBroker {broker!r} is not ready yet (no URL)")
        admin = spec.get("admin") or {}
        raw = k8s.secret_value(namespace, admin.get("name", ""), admin.get("key", "admin.json"))
        if raw is None:
            raise Failure(f"admin Secret {admin.get('name')!r} of KeyBroker {broker!r} not found")
        self._ca_file: IO[bytes] | None = None
        ca = None
        tls = spec.get("tls")
        if tls and url.startswith("https://"):
            pem = k8s.secret_value(namespace, tls["name"], "ca.crt")
            if pem is None:
                raise Failure(f"TLS Secret {tls['name']!r} of KeyBroker {broker!r} not found")
            self._ca_file = tempfile.NamedTemporaryFile(prefix="cove-kbs-ca-", suffix=".pem")
            self._ca_file.write(pem)
            self._ca_file.flush()
            ca = Path(self._ca_file.name)

        def not_admin_key(problem: str) -> Failure:
            return Failure(f"admin Secret {admin.get('name')!r} is not a Cove admin key: {problem}")

        # An admin key file (docs/kbs.md): name, audience, url, jwk.
        fields = Fields(decode_json(raw, not_admin_key, "its value", limit=ADMIN_KEY_LIMIT), "it", not_admin_key)
        name = fields.text("name")
        audience = fields.text("audience", max_len=1024) if fields.map.get("audience") is not None else None
        try:
            key = jose.load_private_jwk(json.dumps(fields.value("jwk", dict)))
        except (ValueError, KeyError, TypeError) as exc:
            raise not_admin_key(str(exc)) from None
        self.client = AdminClient(url, key, name, ca, audience, timeout=15)

    def __enter__(self) -> AdminClient:
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        if self._ca_file is not None:
            self._ca_file.close()


def _namespaced(namespace: str | None) -> str:
    """The namespace of a namespaced object (kopf types it optional for cluster-wide ones)."""
    if not namespace:
        raise kopf.PermanentError("the object has no namespace")
    return namespace


def _sync(patch: kopf.Patch, retry: int, work: Callable[[], None]) -> None:
    """Run WORK; a broker or API failure becomes status and a retry with back-off."""
    from cove.kbs.client import KbsError

    try:
        work()
    except (Failure, MissingKey) as exc:
        _fail(patch, retry, str(exc))
    except KbsError as exc:
        _fail(patch, retry, exc.line())
    except httpx.HTTPError as exc:
        _fail(patch, retry, f"the Kubernetes API failed: {exc}")


def _missing(exc: Exception) -> bool:
    return getattr(exc, "status", None) == 404


# -- owners of broker entries ----------------------------------------------------------------------
def _owner(kind: str, namespace: str, name: str, meta: Mapping[str, Any]) -> str:
    """Who made a broker entry: the object's kind, namespace, name and uid (a re-created object is another)."""
    return f"{kind} {namespace}/{name} uid={meta.get('uid', '')}"


def _marked(owner: str, body: str) -> str:
    return f"{OWNER_MARK}{owner}\n{body}"


def _owner_of(body: str) -> str | None:
    """The owner a policy's text names on its first line, or None (made outside the operator, or before markers)."""
    first = body.split("\n", 1)[0]
    return first[len(OWNER_MARK) :] if first.startswith(OWNER_MARK) else None


def _held(admin: AdminClient, policy: str) -> tuple[bool, str | None]:
    """Whether the broker has POLICY, and the owner its marker names."""
    from cove.kbs.client import KbsError

    try:
        body = str(admin.policy(policy).get("body") or "")
    except KbsError as exc:
        if not _missing(exc):
            raise
        return False, None
    return True, _owner_of(body)


def _secret_marker(path: str) -> str:
    """The name of the policy that records which EnclaveSecret made the broker secret at PATH."""
    return SECRET_MARKER_PREFIX + hashlib.sha256(path.encode()).hexdigest()[:40]


def _ours(held: str | None, owner: str, legacy: bool) -> bool:
    """An entry is ours if its marker names us, or it has none and our status says we made it (before markers)."""
    return held == owner or (held is None and legacy)


def _not_ours(what: str, held: str | None) -> Failure:
    by = held or "nothing Cove's operator made (no owner marker)"
    return Failure(f"{what} already exists in the broker and belongs to {by}; it is not adopted")


# -- EnclavePolicy ---------------------------------------------------------------------------------
def _policy_name(spec: Mapping[str, Any], name: str) -> str:
    chosen: str = spec.get("name") or name
    return chosen


@kopf.on.resume(GROUP, VERSION, "enclavepolicies")
@kopf.on.create(GROUP, VERSION, "enclavepolicies")
@kopf.on.update(GROUP, VERSION, "enclavepolicies")
def enclave_policy(
    spec: kopf.Spec,
    name: str,
    namespace: str | None,
    patch: kopf.Patch,
    retry: int,
    meta: kopf.Meta,
    status: kopf.Status,
    **_: Any,
) -> None:
    from cove.kbs.client import KbsError

    where = _namespaced(namespace)
    policy_name = _policy_name(spec, name)
    old = status.get("policyId")
    owner = _owner("EnclavePolicy", where, name, meta)
    want = _marked(owner, spec["policy"])

    def work() -> None:
        with Broker(where, spec["broker"]) as admin:
            present, held = _held(admin, policy_name)
            if present and not _ours(held, owner, legacy=old == policy_name):
                raise _not_ours(f"policy {policy_name!r}", held)
            current = admin.policy(policy_name) if present else None
            if current is None or current.get("body") != want:
                admin.put_policy(policy_name, want)
                current = admin.policy(policy_name)
            if old and old != policy_name:  # renamed: the old name goes once the new one is in
                present, held = _held(admin, old)
                if present and _ours(held, owner, legacy=True):
                    try:
                        admin.delete_policy(old)
                    except KbsError as exc:
                        if not _missing(exc):
                            raise
            _ready(patch, meta.get("generation"), policyId=policy_name, policyVersion=current.get("version"))

    _sync(patch, retry, work)


@kopf.on.delete(GROUP, VERSION, "enclavepolicies")
def enclave_policy_gone(
    spec: kopf.Spec,
    name: str,
    namespace: str | None,
    patch: kopf.Patch,
    retry: int,
    status: kopf.Status,
    meta: kopf.Meta,
    **_: Any,
) -> None:
    from cove.kbs.client import KbsError

    where = _namespaced(namespace)
    policy_name = status.get("policyId") or _policy_name(spec, name)
    owner = _owner("EnclavePolicy", where, name, meta)

    def work() -> None:
        with Broker(where, spec["broker"]) as admin:
            present, held = _held(admin, policy_name)
            if not present:
                return
            if not _ours(held, owner, legacy=status.get("policyId") == policy_name):
                log.warning(
                    "EnclavePolicy %s/%s deleted; policy %r belongs to %s, left alone", where, name, policy_name, held
                )
                return
            try:
                admin.delete_policy(policy_name)
            except KbsError as exc:
                if not _missing(exc):  # 409: a secret still uses it; retried until that secret goes
                    raise

    _sync(patch, retry, work)


# -- EnclaveSecret ---------------------------------------------------------------------------------
def _broker_policy(namespace: str, policy: str) -> str:
    obj = api().get(f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/enclavepolicies/{policy}")
    if obj is None:
        raise Failure(f"EnclavePolicy {policy!r} not found in {namespace}")
    if (obj.get("status") or {}).get("phase") != "Ready":
        raise Failure(f"EnclavePolicy {policy!r} is not synced yet")
    policy_id: str = obj["status"]["policyId"]
    return policy_id


def _imported(namespace: str, spec: Mapping[str, Any], importer: str) -> bytes | None:
    """The value of the Secret spec.import names, if that Secret lets IMPORTER (an EnclaveSecret) take it."""
    ref = spec.get("import")
    if not ref:
        return None
    secret = api().get(f"/api/v1/namespaces/{namespace}/secrets/{ref['name']}")
    if secret is None:
        raise Failure(f"Secret {ref['name']!r} to import not found in {namespace}")
    allowed = str(((secret.get("metadata") or {}).get("annotations") or {}).get(IMPORTABLE_BY, ""))
    if importer not in {part.strip() for part in allowed.split(",")}:
        raise Failure(
            f"Secret {ref['name']!r} does not let EnclaveSecret {importer!r} import it: "
            f"annotate the Secret {IMPORTABLE_BY}={importer}"
        )
    data = (secret.get("data") or {}).get(ref.get("key", "value"))
    if not isinstance(data, str):
        raise MissingKey(f"Secret {ref['name']!r} has no key {ref.get('key', 'value')!r}")
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        raise Failure(f"Secret {ref['name']!r}: key {ref.get('key', 'value')!r} is not base64") from None


@kopf.on.resume(GROUP, VERSION, "enclavesecrets")
@kopf.on.create(GROUP, VERSION, "enclavesecrets")
@kopf.on.update(GROUP, VERSION, "enclavesecrets")
def enclave_secret(
    spec: kopf.Spec,
    name: str,
    namespace: str | None,
    patch: kopf.Patch,
    retry: int,
    meta: kopf.Meta,
    status: kopf.Status,
    **_: Any,
) -> None:
    from cove.kbs.client import KbsError

    where = _namespaced(namespace)
    path = spec["path"]
    if bool(spec.get("generate")) == bool(spec.get("import")):
        raise kopf.PermanentError("an EnclaveSecret has exactly one of spec.generate and spec.import")

    owner = _owner("EnclaveSecret", where, name, meta)
    marker = _secret_marker(path)
    # Before owner markers: this object's status says it made the secret at this path.
    legacy = status.get("currentVersion") is not None and status.get("path", path) == path

    def work() -> None:
        policy = _broker_policy(where, spec["policy"])
        value = _imported(where, spec, name)
        with Broker(where, spec["broker"]) as admin:
            try:
                current = admin.secret(path)
            except KbsError as exc:
                if not _missing(exc):
                    raise
                current = None
            marked, held = _held(admin, marker)
            if (marked and held != owner) or (current is not None and not _ours(held, owner, legacy)):
                raise _not_ours(f"secret {path!r}", held)
            if not marked:  # the marker first: a crash before the secret leaves an entry that is ours
                admin.put_policy(marker, _marked(owner, MARKER_BODY))
            rotation = int(spec.get("rotation", 0))
            if current is None:
                generate = spec.get("generate") or {}
                admin.create_secret(
                    path,
                    generate.get("kind", "data"),
                    policy,
                    exportable=bool(spec.get("exportable", False)),
                    params=generate.get("params") or {},
                    value=value,
                )
                base = 1  # the version the broker gave the new secret; each rotation adds one
                version = 1
            else:
                if current.get("policy") != policy:
                    admin.set_secret_policy(path, policy)
                version = int(current["version"])
                # Adopted (no status yet): take the broker's version as already rotated as asked.
                base = int(status.get("baseVersion") or max(1, version - rotation))
            # The broker's version, not a count kept here, says what is done: a retry after a
            # lost status patch does not rotate twice.
            while version < base + rotation:
                admin.rotate_secret(path, value)
                version += 1
            current = admin.secret(path)
            versions = [{"version": v["version"], "created_at": str(v["created_at"])} for v in current["versions"]]
            _ready(
                patch,
                meta.get("generation"),
                currentVersion=current["version"],
                versions=versions,
                rotation=rotation,
                baseVersion=base,
                brokerPolicy=current["policy"],
                path=path,
            )

    _sync(patch, retry, work)


@kopf.on.delete(GROUP, VERSION, "enclavesecrets")
def enclave_secret_gone(
    spec: kopf.Spec,
    name: str,
    namespace: str | None,
    patch: kopf.Patch,
    retry: int,
    status: kopf.Status,
    meta: kopf.Meta,
    **_: Any,
) -> None:
    from cove.kbs.client import KbsError

    where = _namespaced(namespace)
    path = spec["path"]
    owner = _owner("EnclaveSecret", where, name, meta)
    legacy = status.get("currentVersion") is not None and status.get("path", path) == path

    def work() -> None:
        with Broker(where, spec["broker"]) as admin:
            marked, held = _held(admin, _secret_marker(path))
            if not _ours(held, owner, legacy):  # another object's, or made outside the operator
                if marked:
                    log.warning("EnclaveSecret %s/%s deleted; secret %r is %s's, left alone", where, name, path, held)
                return
            for delete, what in ((admin.delete_secret, path), (admin.delete_policy, _secret_marker(path))):
                try:
                    delete(what)
                except KbsError as exc:
                    if not _missing(exc):
                        raise

    _sync(patch, retry, work)
