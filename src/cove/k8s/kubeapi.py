"""A small synchronous client of the Kubernetes API with the pod's own credentials.

In a cluster: the service account's token and CA. Outside one: ``$COVE_K8S_API``,
an API server URL that needs no credentials of its own (``kubectl proxy``).
Used by the operator and the node agent; httpx rather than the official client,
which would be a large dependency for a handful of calls.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import httpx

API_ENV = "COVE_K8S_API"
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# A Kubernetes object as the API server sends it (JSON).
JSONObject = dict[str, Any]


class Unconfigured(Exception):
    """No way to the API server."""


class MissingKey(Exception):
    """A Secret exists but lacks the key asked for."""


def credentials_present() -> bool:
    """Whether a way to the API server is configured: $COVE_K8S_API (e.g. `kubectl proxy`) or a service account."""
    if os.environ.get(API_ENV):
        return True
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (SA_DIR / "token").is_file()


class Api:
    """A small synchronous client of the Kubernetes API, with the operator's own credentials."""

    def __init__(self) -> None:
        server = os.environ.get(API_ENV)
        if server:
            self.http = httpx.Client(base_url=server, timeout=15)
            return
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise Unconfigured(f"no Kubernetes API: not in a cluster and ${API_ENV} is not set")
        token = (SA_DIR / "token").read_text().strip()
        self.http = httpx.Client(
            base_url=f"https://{host}:{port}",
            verify=str(SA_DIR / "ca.crt"),
            timeout=15,
            headers={"Authorization": f"Bearer {token}"},
        )

    def get(self, path: str) -> JSONObject | None:
        response = self.http.get(path)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        body: JSONObject = response.json()
        return body

    def apply(self, collection: str, obj: JSONObject) -> JSONObject:
        """Create OBJ in COLLECTION, or merge it into the existing one: the same call converges."""
        response = self.http.post(collection, json=obj)
        if response.status_code == 409:
            response = self.http.patch(
                f"{collection}/{obj['metadata']['name']}",
                json=obj,
                headers={"Content-Type": "application/merge-patch+json"},
            )
        response.raise_for_status()
        body: JSONObject = response.json()
        return body

    def secret_value(self, namespace: str, name: str, key: str) -> bytes | None:
        secret = self.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
        if secret is None:
            return None
        data = (secret.get("data") or {}).get(key)
        if data is None:
            raise MissingKey(f"Secret {name!r} has no key {key!r}")
        return base64.b64decode(data)

    def merge_patch(self, path: str, body: JSONObject) -> JSONObject:
        response = self.http.patch(path, json=body, headers={"Content-Type": "application/merge-patch+json"})
        response.raise_for_status()
        answer: JSONObject = response.json()
        return answer
