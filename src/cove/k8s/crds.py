"""The operator's CustomResourceDefinitions, one source for the chart and the tests.

``python -m cove.k8s.crds DIR`` writes them as YAML-compatible JSON files
(charts/cove/crds/); tests/k8s/test_chart.py checks the chart's copies match.
Secret values never appear in a CR: only references to Kubernetes Secrets and
generation requests the broker fulfils itself (never-export by default).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

GROUP = "cove.dev"
VERSION = "v1alpha1"

_NAME = {"type": "string", "minLength": 1, "maxLength": 253, "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}
_SECRET_KEY = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _NAME, "key": {"type": "string", "minLength": 1, "maxLength": 253}},
}
_CONDITIONS = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string"},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "lastTransitionTime": {"type": "string"},
        },
    },
}
_STATUS_COMMON = {
    "phase": {"type": "string", "enum": ["Pending", "Ready", "Error", "Deleting"]},
    "message": {"type": "string"},
    "lastSync": {"type": "string", "format": "date-time"},
    "retries": {"type": "integer"},
    "observedGeneration": {"type": "integer", "format": "int64"},
    "conditions": _CONDITIONS,
}
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_BROKER_REF = {
    "type": "string",
    "minLength": 1,
    "maxLength": 253,
    "pattern": _NAME["pattern"],
    "description": "A KeyBroker in the same namespace.",
}

KEY_BROKER_SPEC = {
    "type": "object",
    "description": "A key broker: run by the operator (database set) or an existing one (external set).",
    "properties": {
        "replicas": {"type": "integer", "minimum": 1, "maximum": 64, "default": 2},
        "image": {"type": "string", "minLength": 1, "maxLength": 512},
        "database": {**_SECRET_KEY, "description": "Secret holding the PostgreSQL URL (key default: url)."},
        "masterKey": {**_SECRET_KEY, "description": "Secret holding the 32-byte master key (key default: master.key)."},
        "tls": {**_SECRET_KEY, "description": "Secret of type kubernetes.io/tls; ca.crt is given to clients."},
        "admin": {**_SECRET_KEY, "description": "Secret holding the operator's admin key (key default: admin.json)."},
        "external": {
            "type": "object",
            "required": ["url"],
            "properties": {"url": {"type": "string", "pattern": r"^https?://[^\s]+$", "maxLength": 2048}},
        },
        "policy": {"type": "string", "maxLength": 65536, "description": "The attestation policy (TOML)."},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535, "default": 8443},
    },
    "required": ["admin"],
    "oneOf": [{"required": ["external"]}, {"required": ["database", "masterKey", "tls"]}],
}
ENCLAVE_POLICY_SPEC = {
    "type": "object",
    "required": ["broker", "policy"],
    "properties": {
        "broker": _BROKER_REF,
        "name": {
            "type": "string",
            "pattern": r"^[A-Za-z0-9._-]{1,64}$",
            "description": "The policy's name in the broker (default: the object's name).",
        },
        "policy": {
            "type": "string",
            "minLength": 1,
            "maxLength": 65536,
            "description": "The release policy (TOML, docs/policy.md).",
        },
    },
}
ENCLAVE_SECRET_SPEC = {
    "type": "object",
    "required": ["broker", "path", "policy"],
    "properties": {
        "broker": _BROKER_REF,
        "path": {
            "type": "string",
            "pattern": f"^{_SEGMENT}/{_SEGMENT}/{_SEGMENT}$",
            "description": "repository/type/tag in the broker.",
        },
        "policy": {"type": "string", "pattern": _NAME["pattern"], "description": "An EnclavePolicy's name."},
        "generate": {
            "type": "object",
            "required": ["kind"],
            "properties": {
                "kind": {
                    "type": "string",
                    "enum": ["aes-256", "ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096", "cert", "password"],
                },
                "params": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "import": {**_SECRET_KEY, "description": "Import the value from this Kubernetes Secret (key default: value)."},
        "exportable": {
            "type": "boolean",
            "default": False,
            "description": "Whether an admin may read the value back; never for generated keys by default.",
        },
        "rotation": {
            "type": "integer",
            "minimum": 0,
            "default": 0,
            "description": "Raise to rotate: each increase adds a version in the broker.",
        },
    },
    "oneOf": [{"required": ["generate"]}, {"required": ["import"]}],
}


def _crd(
    kind: str,
    plural: str,
    short: list[str],
    spec: dict[str, Any],
    status_extra: dict[str, Any],
    columns: list[dict[str, str]],
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "cove"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short,
                "listKind": f"{kind}List",
                "categories": ["cove"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        *columns,
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Last sync", "type": "date", "jsonPath": ".status.lastSync"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": {
                                    "type": "object",
                                    "properties": {**_STATUS_COMMON, **status_extra},
                                    "x-kubernetes-preserve-unknown-fields": True,
                                },
                            },
                        }
                    },
                }
            ],
        },
    }


CRDS = [
    _crd(
        "KeyBroker",
        "keybrokers",
        ["kb"],
        KEY_BROKER_SPEC,
        {"url": {"type": "string"}, "readyReplicas": {"type": "integer"}},
        [{"name": "URL", "type": "string", "jsonPath": ".status.url"}],
    ),
    _crd(
        "EnclavePolicy",
        "enclavepolicies",
        ["ep"],
        ENCLAVE_POLICY_SPEC,
        {"policyId": {"type": "string"}, "policyVersion": {"type": "integer"}},
        [
            {"name": "Broker", "type": "string", "jsonPath": ".spec.broker"},
            {"name": "Policy id", "type": "string", "jsonPath": ".status.policyId"},
        ],
    ),
    _crd(
        "EnclaveSecret",
        "enclavesecrets",
        ["es"],
        ENCLAVE_SECRET_SPEC,
        {
            "currentVersion": {"type": "integer"},
            "rotation": {"type": "integer"},
            "baseVersion": {"type": "integer"},
            "versions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"version": {"type": "integer"}, "created_at": {"type": "string"}},
                },
            },
            "brokerPolicy": {"type": "string"},
        },
        [
            {"name": "Path", "type": "string", "jsonPath": ".spec.path"},
            {"name": "Version", "type": "integer", "jsonPath": ".status.currentVersion"},
        ],
    ),
]


def write(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for crd in CRDS:
        target = folder / f"{crd['metadata']['name']}.yaml"
        temp = target.with_suffix(".tmp")
        temp.write_text(
            "# Generated by `python -m cove.k8s.crds charts/cove/crds`; do not edit.\n"
            + json.dumps(crd, indent=2, sort_keys=True)
            + "\n"
        )
        temp.replace(target)


if __name__ == "__main__":
    write(Path(sys.argv[1]))
