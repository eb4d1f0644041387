"""The operator under kopf's testing toolkit against kmock, syncing into a real `cove kbs serve` (SQLite)."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import subprocess
import time
from pathlib import Path

import jsonschema
import kmock as kmocklib
import kubernetes_validate
import pytest
from kopf.testing import KopfRunner

from cove.k8s import crds
from cove.kbs.client import AdminClient, KbsError
from tests.conftest import COVE
from tests.k8s.conftest import free_port

NS = "apps"
API = f"/apis/{crds.GROUP}/{crds.VERSION}/namespaces/{NS}"
POLICY = 'types = ["cove"]\n[cove]\nmeasurements = ["' + "ab" * 32 + '"]\n'
POLICY_2 = 'types = ["cove"]\n[cove]\nmeasurements = ["' + "cd" * 32 + '"]\n'


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """A real broker on loopback with SQLite and TLS, as `cove kbs init` and `cove kbs serve` make it."""
    state = tmp_path_factory.mktemp("kbs") / "state"
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    subprocess.run(
        [COVE, "kbs", "init", "--state", str(state), "--url", url], check=True, capture_output=True, timeout=120
    )
    proc = subprocess.Popen(
        [COVE, "kbs", "serve", "--state", str(state), "--listen", f"127.0.0.1:{port}"],
        stderr=subprocess.PIPE,
        text=True,
    )
    admin = AdminClient.from_file(url, state / "admin.json", state / "tls.crt")
    deadline = time.monotonic() + 60
    while True:
        try:
            admin.policies()
            break
        except Exception:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the broker did not start"
            time.sleep(0.1)
    yield {"url": url, "state": state, "admin": admin}
    admin.close()
    proc.terminate()
    proc.wait(timeout=10)


def _secret(name: str, data: dict[str, bytes], importable_by: str | None = None) -> dict:
    meta: dict = {"name": name, "namespace": NS}
    if importable_by is not None:
        meta["annotations"] = {"cove.dev/importable-by": importable_by}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


def _body(policy: str) -> str:
    """What the broker holds: the owner marker on the first line, then the policy's text."""
    held, rest = policy.split("\n", 1)
    assert held.startswith("# cove.dev/owner: "), held
    return rest


def _markers(admin) -> set[str]:
    return {p["name"] for p in admin.policies() if p["name"].startswith("cove-owner.")}


def _cr(kind: str, name: str, spec: dict) -> dict:
    return {
        "apiVersion": f"{crds.GROUP}/{crds.VERSION}",
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": NS,
            "resourceVersion": "1",  # as an API server sets them
            "uid": f"00000000-0000-4000-8000-{abs(hash(name)) % 10**12:012d}",
        },
        "spec": spec,
    }


class Cluster:
    """kmock as the API server, with the resources the operator uses declared for discovery."""

    def __init__(self, kmock):
        self.kmock = kmock
        for crd in crds.CRDS:
            names = crd["spec"]["names"]
            kmock.resources[f"{crds.GROUP}/{crds.VERSION}/{names['plural']}"] = kmocklib.ResourceInfo(
                kind=names["kind"],
                singular=names["singular"],
                namespaced=True,
                subresources={"status"},
                verbs={"list", "watch", "get", "create", "patch", "update", "delete"},
            )
        for resource, kind in (
            ("v1/secrets", "Secret"),
            ("v1/services", "Service"),
            ("v1/events", "Event"),
            ("v1/configmaps", "ConfigMap"),
            ("apps/v1/deployments", "Deployment"),
        ):
            kmock.resources[resource] = kmocklib.ResourceInfo(
                kind=kind, namespaced=True, verbs={"list", "watch", "get", "create", "patch"}
            )
        for resource, kind in (
            ("v1/namespaces", "Namespace"),
            ("apiextensions.k8s.io/v1/customresourcedefinitions", "CustomResourceDefinition"),
        ):
            kmock.resources[resource] = kmocklib.ResourceInfo(kind=kind, namespaced=False, verbs={"list", "watch"})

    async def create(self, collection: str, obj: dict) -> None:
        async with self.kmock.post(collection, json=obj) as response:
            assert response.status < 300, await response.text()

    async def patch(self, path: str, body: dict) -> None:
        async with self.kmock.patch(path, json=body, headers={"Content-Type": "application/merge-patch+json"}) as r:
            assert r.status < 300, await r.text()

    async def delete(self, path: str) -> None:
        async with self.kmock.delete(path) as response:
            assert response.status < 300, await response.text()

    async def get(self, path: str) -> dict | None:
        async with self.kmock.get(path) as response:
            return None if response.status == 404 else await response.json()

    async def until(self, path: str, test, timeout: float = 30) -> dict | None:
        deadline = time.monotonic() + timeout
        while True:
            obj = await self.get(path)
            if test(obj):
                return obj
            assert time.monotonic() < deadline, f"{path} never got there: {json.dumps(obj)[:2000]}"
            await asyncio.sleep(0.1)


def _phase(phase: str, **fields):
    def test(obj):
        status = (obj or {}).get("status") or {}
        return status.get("phase") == phase and all(status.get(k) == v for k, v in fields.items())

    return test


class Operator:
    """`kopf run` of the operator module in kopf's KopfRunner thread, stopped without blocking kmock's loop."""

    def __init__(self, monkeypatch, kmock):
        monkeypatch.setenv("COVE_K8S_API", str(kmock.url).rstrip("/"))
        self.runner = KopfRunner(
            ["run", "--standalone", "--verbose", "--all-namespaces", "-m", "cove.k8s.operator"], timeout=30
        )

    async def __aenter__(self):
        self.runner.__enter__()
        return self

    async def __aexit__(self, *exc):
        await asyncio.to_thread(self.runner.__exit__, *exc)


async def _external_broker(cluster: Cluster, broker: dict, name: str = "kbs", url: str | None = None) -> None:
    state: Path = broker["state"]
    await cluster.create(
        f"/api/v1/namespaces/{NS}/secrets",
        _secret(f"{name}-admin", {"admin.json": (state / "admin.json").read_bytes()}),
    )
    await cluster.create(
        f"/api/v1/namespaces/{NS}/secrets", _secret(f"{name}-tls", {"ca.crt": (state / "tls.crt").read_bytes()})
    )
    await cluster.create(
        f"{API}/keybrokers",
        _cr(
            "KeyBroker",
            name,
            {
                "external": {"url": url or broker["url"]},
                "admin": {"name": f"{name}-admin"},
                "tls": {"name": f"{name}-tls"},
            },
        ),
    )


@pytest.mark.asyncio
async def test_policies_and_secrets_follow_their_objects(kmock, broker, monkeypatch):
    cluster, admin = Cluster(kmock), broker["admin"]
    await _external_broker(cluster, broker)
    async with Operator(monkeypatch, kmock):
        await cluster.until(f"{API}/keybrokers/kbs", _phase("Ready", url=broker["url"]))

        await cluster.create(f"{API}/enclavepolicies", _cr("EnclavePolicy", "app", {"broker": "kbs", "policy": POLICY}))
        await cluster.until(f"{API}/enclavepolicies/app", _phase("Ready", policyId="app", policyVersion=1))
        assert _body(admin.policy("app")["body"]) == POLICY

        await cluster.create(
            f"{API}/enclavesecrets",
            _cr(
                "EnclaveSecret",
                "volume",
                {"broker": "kbs", "path": "prod/volume/data", "policy": "app", "generate": {"kind": "aes-256"}},
            ),
        )
        await cluster.create(
            f"/api/v1/namespaces/{NS}/secrets", _secret("flags", {"value": b'{"beta": true}'}, "other, flags")
        )
        await cluster.create(
            f"{API}/enclavesecrets",
            _cr(
                "EnclaveSecret",
                "flags",
                {
                    "broker": "kbs",
                    "path": "prod/cfg/flags",
                    "policy": "app",
                    "import": {"name": "flags"},
                    "exportable": True,
                },
            ),
        )
        volume = await cluster.until(f"{API}/enclavesecrets/volume", _phase("Ready", currentVersion=1))
        await cluster.until(f"{API}/enclavesecrets/flags", _phase("Ready", currentVersion=1))
        assert volume["status"]["brokerPolicy"] == "app" and len(volume["status"]["versions"]) == 1
        held = admin.secret("prod/volume/data")
        assert held["kind"] == "aes-256" and held["policy"] == "app" and not held["exportable"]
        assert admin.export("prod/cfg/flags") == b'{"beta": true}'
        assert "value" not in json.dumps(volume["spec"])  # the CR never carries a value

        # An update: the policy's text changes, the secret rotates; the broker follows, once.
        await cluster.patch(f"{API}/enclavepolicies/app", {"spec": {"policy": POLICY_2}, "metadata": {"generation": 2}})
        await cluster.until(f"{API}/enclavepolicies/app", _phase("Ready", policyVersion=2))
        assert _body(admin.policy("app")["body"]) == POLICY_2
        await cluster.patch(f"{API}/enclavesecrets/volume", {"spec": {"rotation": 1}, "metadata": {"generation": 2}})
        await cluster.until(f"{API}/enclavesecrets/volume", _phase("Ready", currentVersion=2, rotation=1))
        assert admin.secret("prod/volume/data")["version"] == 2
        # A status patch that was lost (the object forgets what was rotated): the next pass does not rotate again.
        await cluster.patch(f"{API}/enclavesecrets/volume/status", {"status": {"baseVersion": None, "rotation": None}})
        await cluster.patch(
            f"{API}/enclavesecrets/volume", {"metadata": {"labels": {"touched": "yes"}, "generation": 3}}
        )
        await cluster.until(f"{API}/enclavesecrets/volume", _phase("Ready", baseVersion=1))
        assert admin.secret("prod/volume/data")["version"] == 2

        # Deletion: finalizers take each out of the broker before the object goes.
        for name in ("volume", "flags"):
            await cluster.delete(f"{API}/enclavesecrets/{name}")
            await cluster.until(f"{API}/enclavesecrets/{name}", lambda obj: obj is None)
        assert {s["path"] for s in admin.secrets()} == set() and _markers(admin) == set()
        await cluster.delete(f"{API}/enclavepolicies/app")
        await cluster.until(f"{API}/enclavepolicies/app", lambda obj: obj is None)
        assert "app" not in {p["name"] for p in admin.policies()}


async def _error(cluster: Cluster, path: str, words: str) -> None:
    failed = await cluster.until(path, _phase("Error"))
    assert words in failed["status"]["message"], failed["status"]["message"]


@pytest.mark.asyncio
async def test_entries_and_secrets_of_others_are_not_taken(kmock, broker, monkeypatch):
    """M3: no import without the Secret's opt-in; no adopting, and no deleting, of another object's broker entry."""
    cluster, admin = Cluster(kmock), broker["admin"]
    await _external_broker(cluster, broker, "kbs2")
    admin.put_policy("hand-policy", POLICY)  # an administrator's own entries, made without the operator
    admin.create_secret("made/by/hand", "aes-256", "hand-policy")
    async with Operator(monkeypatch, kmock):
        await cluster.create(
            f"{API}/enclavepolicies", _cr("EnclavePolicy", "own", {"broker": "kbs2", "policy": POLICY})
        )
        await cluster.until(f"{API}/enclavepolicies/own", _phase("Ready"))
        secret = {"broker": "kbs2", "path": "prod/db/key", "policy": "own", "generate": {"kind": "aes-256"}}
        await cluster.create(f"{API}/enclavesecrets", _cr("EnclaveSecret", "db", secret))
        await cluster.until(f"{API}/enclavesecrets/db", _phase("Ready", currentVersion=1))

        # A second object with the same path, or the same broker policy name, takes nothing over.
        await cluster.create(f"{API}/enclavesecrets", _cr("EnclaveSecret", "thief", dict(secret, exportable=True)))
        await _error(cluster, f"{API}/enclavesecrets/thief", "belongs to EnclaveSecret apps/db uid=")
        await cluster.create(
            f"{API}/enclavepolicies",
            _cr("EnclavePolicy", "thief", {"broker": "kbs2", "policy": POLICY_2, "name": "own"}),
        )
        await _error(cluster, f"{API}/enclavepolicies/thief", "belongs to EnclavePolicy apps/own uid=")
        # An entry made outside the operator is not adopted either.
        await cluster.create(f"{API}/enclavesecrets", _cr("EnclaveSecret", "hand", dict(secret, path="made/by/hand")))
        await _error(cluster, f"{API}/enclavesecrets/hand", "no owner marker")
        # Deleting the intruders leaves the owners' entries where they were.
        for kind, name in (("enclavesecrets", "thief"), ("enclavepolicies", "thief"), ("enclavesecrets", "hand")):
            await cluster.delete(f"{API}/{kind}/{name}")
            await cluster.until(f"{API}/{kind}/{name}", lambda obj: obj is None)
        held = admin.secret("prod/db/key")
        assert held["version"] == 1 and held["policy"] == "own" and not held["exportable"]
        assert _body(admin.policy("own")["body"]) == POLICY
        assert admin.secret("made/by/hand")["kind"] == "aes-256"

        # Import: only from a Secret whose annotation names the importing EnclaveSecret.
        imported = dict(secret, path="prod/cfg/token", exportable=True)
        del imported["generate"]
        imported["import"] = {"name": "token"}
        await cluster.create(f"/api/v1/namespaces/{NS}/secrets", _secret("token", {"value": b"t0ken"}))
        await cluster.create(f"{API}/enclavesecrets", _cr("EnclaveSecret", "token", imported))
        await _error(cluster, f"{API}/enclavesecrets/token", "annotate the Secret cove.dev/importable-by=token")
        await cluster.patch(
            f"/api/v1/namespaces/{NS}/secrets/token", {"metadata": {"annotations": {"cove.dev/importable-by": "tok"}}}
        )
        tried = (await cluster.get(f"{API}/enclavesecrets/token"))["status"]["retries"]
        await cluster.until(f"{API}/enclavesecrets/token", lambda o: o["status"]["retries"] > tried)  # tried again
        await _error(cluster, f"{API}/enclavesecrets/token", "does not let EnclaveSecret 'token' import it")
        with pytest.raises(KbsError):
            admin.secret("prod/cfg/token")
        await cluster.patch(
            f"/api/v1/namespaces/{NS}/secrets/token",
            {"metadata": {"annotations": {"cove.dev/importable-by": "token"}}},
        )
        await cluster.patch(f"{API}/enclavesecrets/token", {"metadata": {"labels": {"again": "2"}, "generation": 3}})
        await cluster.until(f"{API}/enclavesecrets/token", _phase("Ready", currentVersion=1))
        assert admin.export("prod/cfg/token") == b"t0ken"

        # Synced before owner markers existed: its own status names the path, so it is taken back, marked.
        admin.create_secret("legacy/db/key", "aes-256", "own")
        legacy = _cr("EnclaveSecret", "legacy", dict(secret, path="legacy/db/key"))
        legacy["status"] = {"phase": "Ready", "currentVersion": 1, "baseVersion": 1}
        await cluster.create(f"{API}/enclavesecrets", legacy)
        await cluster.until(f"{API}/enclavesecrets/legacy", _phase("Ready", path="legacy/db/key"))
        assert len(_markers(admin)) == 3  # db, token, legacy

        for kind, name in (
            ("enclavesecrets", "token"),
            ("enclavesecrets", "db"),
            ("enclavesecrets", "legacy"),
            ("enclavepolicies", "own"),
        ):
            await cluster.delete(f"{API}/{kind}/{name}")
            await cluster.until(f"{API}/{kind}/{name}", lambda obj: obj is None)
        assert {s["path"] for s in admin.secrets()} == {"made/by/hand"} and _markers(admin) == set()
    admin.delete_secret("made/by/hand")
    admin.delete_policy("hand-policy")


@pytest.mark.asyncio
async def test_unreachable_broker_is_retried_with_backoff(kmock, broker, monkeypatch):
    cluster = Cluster(kmock)
    await _external_broker(cluster, broker, "gone", url=f"https://127.0.0.1:{free_port()}")
    async with Operator(monkeypatch, kmock):
        await cluster.create(f"{API}/enclavepolicies", _cr("EnclavePolicy", "p", {"broker": "gone", "policy": POLICY}))
        first = await cluster.until(f"{API}/enclavepolicies/p", _phase("Error"))
        assert "cannot reach the broker" in first["status"]["message"]
        await cluster.until(
            f"{API}/enclavepolicies/p", lambda o: (o["status"].get("retries") or 0) >= 3, timeout=20
        )  # back-off 1 s, 2 s: a third attempt, not a tight loop
        await cluster.create(
            f"{API}/enclavepolicies", _cr("EnclavePolicy", "orphan", {"broker": "nobody", "policy": POLICY})
        )
        orphan = await cluster.until(f"{API}/enclavepolicies/orphan", _phase("Error"))
        assert "KeyBroker 'nobody' not found" in orphan["status"]["message"]


def _admin_key(broker: dict, **changes: object) -> bytes:
    return json.dumps(dict(json.loads((broker["state"] / "admin.json").read_bytes()), **changes)).encode()


HOSTILE_ADMIN_KEYS = {
    "deep nesting": (lambda b: b"[" * 10_000 + b"]" * 10_000, "not valid JSON"),  # was a RecursionError
    "trailing garbage": (lambda b: (b["state"] / "admin.json").read_bytes() + b" {}", "not valid JSON"),
    "wrong top-level type": (lambda b: b'["admin"]', "must be a map"),
    "wrong field type": (lambda b: _admin_key(b, name=7), "name must be a short text string"),  # was accepted
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", HOSTILE_ADMIN_KEYS)
async def test_a_hostile_admin_secret_is_an_error_status(kmock, broker, monkeypatch, case):
    """The admin Secret is read through cove.decode: each is the policy's Error status naming the Secret."""
    make, words = HOSTILE_ADMIN_KEYS[case]
    cluster = Cluster(kmock)
    await _external_broker(cluster, broker, "bad")
    await cluster.patch(
        f"/api/v1/namespaces/{NS}/secrets/bad-admin", {"data": {"admin.json": base64.b64encode(make(broker)).decode()}}
    )
    async with Operator(monkeypatch, kmock):
        await cluster.create(f"{API}/enclavepolicies", _cr("EnclavePolicy", "p", {"broker": "bad", "policy": POLICY}))
        failed = await cluster.until(f"{API}/enclavepolicies/p", _phase("Error"))
    message = failed["status"]["message"]
    assert "admin Secret 'bad-admin' is not a Cove admin key" in message and words in message, message


@pytest.mark.asyncio
async def test_managed_broker_waits_for_its_database_secret(kmock, monkeypatch):
    cluster = Cluster(kmock)
    spec = {
        "replicas": 2,
        "image": "cove/kbs:0.1.0",
        "database": {"name": "pg"},
        "masterKey": {"name": "master"},
        "tls": {"name": "kbs-tls"},
        "admin": {"name": "kbs-admin"},
    }
    async with Operator(monkeypatch, kmock):
        await cluster.create(f"{API}/keybrokers", _cr("KeyBroker", "kbs", spec))
        failed = await cluster.until(f"{API}/keybrokers/kbs", _phase("Error"))
        assert failed["status"]["message"] == f"database Secret 'pg' not found in {NS}"
        assert await cluster.get(f"/apis/apps/v1/namespaces/{NS}/deployments/kbs") is None
        await cluster.create(
            f"/api/v1/namespaces/{NS}/secrets", _secret("pg", {"url": b"postgresql://kbs@pg.apps.svc:5432/kbs"})
        )
        await cluster.create(f"/api/v1/namespaces/{NS}/secrets", _secret("master", {"master.key": b"k" * 32}))
        await cluster.until(f"{API}/keybrokers/kbs", _phase("Ready", url=f"https://kbs.{NS}.svc:8443"), timeout=30)
        # An update (more replicas, a new image) reaches the Deployment: a rolling upgrade.
        await cluster.patch(
            f"{API}/keybrokers/kbs", {"spec": {"replicas": 3, "image": "cove/kbs:0.1.1"}, "metadata": {"generation": 2}}
        )
        await cluster.until(
            f"/apis/apps/v1/namespaces/{NS}/deployments/kbs",
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["image"] == "cove/kbs:0.1.1",
        )
    deployment = await cluster.get(f"/apis/apps/v1/namespaces/{NS}/deployments/kbs")
    service = await cluster.get(f"/api/v1/namespaces/{NS}/services/kbs")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert deployment["metadata"]["ownerReferences"][0]["kind"] == "KeyBroker"
    for obj in (deployment, service):
        for version in ("1.30", "1.34"):
            kubernetes_validate.validate(obj, version, strict=True)


def _strict(schema):
    """The CRD schema as the API server applies it with fieldValidation=Strict: unknown fields refused."""
    schema = copy.deepcopy(schema)
    if isinstance(schema, dict):
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for key, value in list(schema.items()):
            if key == "metadata":
                continue
            schema[key] = _strict(value) if isinstance(value, (dict, list)) else value
    elif isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


SCHEMAS = {
    crd["spec"]["names"]["kind"]: _strict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]) for crd in crds.CRDS
}
GOOD = {
    "KeyBroker": {"external": {"url": "https://kbs.example:8443"}, "admin": {"name": "a"}},
    "EnclavePolicy": {"broker": "kbs", "policy": POLICY},
    "EnclaveSecret": {"broker": "kbs", "path": "prod/db/password", "policy": "app", "generate": {"kind": "password"}},
}
BAD = [
    ("KeyBroker", {"admin": {"name": "a"}}),  # neither external nor a database
    ("KeyBroker", {**GOOD["KeyBroker"], "replicas": 0}),
    ("KeyBroker", {**GOOD["KeyBroker"], "external": {"url": "file:///etc/passwd"}}),
    ("EnclavePolicy", {"broker": "kbs"}),
    ("EnclavePolicy", {**GOOD["EnclavePolicy"], "name": "../escape"}),
    ("EnclaveSecret", {**GOOD["EnclaveSecret"], "path": "../../etc"}),
    ("EnclaveSecret", {**GOOD["EnclaveSecret"], "generate": {"kind": "des"}}),
    ("EnclaveSecret", {**GOOD["EnclaveSecret"], "import": {"name": "s"}}),  # both generate and import
    ("EnclaveSecret", {**GOOD["EnclaveSecret"], "value": "hunter2"}),  # a value in the CR
    ("EnclaveSecret", {**GOOD["EnclaveSecret"], "rotation": -1}),
]


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_schema_accepts_good_objects(kind):
    jsonschema.validate(_cr(kind, "x", GOOD[kind]), SCHEMAS[kind])


@pytest.mark.parametrize("kind,spec", BAD, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BAD)])
def test_schema_refuses_malformed_objects(kind, spec):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_cr(kind, "x", spec), SCHEMAS[kind])


def test_crds_are_valid_kubernetes_objects():
    for crd in crds.CRDS:
        for version in ("1.30", "1.34"):
            kubernetes_validate.validate(crd, version, strict=True)


def test_operator_without_credentials_is_one_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([COVE, "k8s", "operator"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 7, proc.stderr
    assert proc.stderr.count("\n") == 1 and "no Kubernetes API credentials" in proc.stderr
