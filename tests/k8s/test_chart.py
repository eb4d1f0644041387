"""The Helm chart: lint, render with default and fully enabled values, validate every object."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cove.k8s import crds
from tests.conftest import ROOT

CHART = ROOT / "charts" / "cove"
K8S_VERSIONS = ["1.30", "1.31", "1.32", "1.33", "1.34"]
# Kinds whose schemas ship with their own projects, not with Kubernetes: checked for shape only.
THIRD_PARTY = {
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
FULL = {
    "image": {"digest": "sha256:" + "0123456789abcdef" * 4},
    "nodeAgent": {"mode": "nfd"},
    "webhook": {
        "certManager": {"enabled": True},
        "kbs": {"url": "https://kbs.cove-system.svc:8443", "ca": "PEM", "timeout": 10},
        "namespaceSelector": {"matchLabels": {"cove.dev/enclaves": "allowed"}},
    },
    "operator": {"namespaces": ["apps", "payments"], "kbsImage": "cove/kbs:0.1.0"},
    "keyBroker": {"enabled": True, "policy": 'types = ["cove"]\n'},
    "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "daemon": {"metrics": {"enabled": True}},
}


@pytest.fixture(scope="module")
def helm() -> str:
    found = shutil.which("helm") or shutil.which("helm", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("helm is not installed: run `scripts/setup` (it runs deploy/get_helm.py)", pytrace=False)
    return found


def render(helm: str, values: dict | None, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [helm, "template", "cove", str(CHART), "--namespace", "cove-system", "--include-crds", *extra]
    if values is not None:
        (tmp_path / "values.json").write_text(json.dumps(values))
        args += ["-f", str(tmp_path / "values.json")]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("values", [None, FULL], ids=["default", "full"])
def test_lint_is_clean(helm, tmp_path, values):
    extra = []
    if values is not None:
        (tmp_path / "v.json").write_text(json.dumps(values))
        extra = ["-f", str(tmp_path / "v.json")]
    proc = subprocess.run([helm, "lint", "--strict", str(CHART), *extra], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout


@pytest.mark.parametrize("values", [None, FULL], ids=["default", "full"])
def test_every_rendered_object_is_valid(helm, tmp_path, values):
    proc = render(helm, values, tmp_path)
    assert proc.returncode == 0, proc.stderr
    objects = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    kinds = {obj["kind"] for obj in objects}
    assert {
        "DaemonSet",
        "RuntimeClass",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
        "CustomResourceDefinition",
        "Deployment",
    } <= kinds
    key_broker_schema = crds.CRDS[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in THIRD_PARTY:
            assert obj["metadata"]["name"] and obj["spec"]
        elif obj["kind"] == "KeyBroker":
            jsonschema.validate(obj, key_broker_schema)
        else:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(obj, version, strict=True)
    if values is FULL:
        images = {
            c["image"]
            for obj in objects
            if obj["kind"] in ("Deployment", "DaemonSet")
            for c in obj["spec"]["template"]["spec"]["containers"]
        }
        assert images == {"cove/cove@" + FULL["image"]["digest"]}


def test_runtime_class_and_webhooks_say_what_the_docs_say(helm, tmp_path):
    objects = {
        (o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(render(helm, None, tmp_path).stdout) if o
    }
    runtime_class = objects["RuntimeClass", "cove"]
    assert runtime_class["handler"] == "cove"
    assert runtime_class["scheduling"]["nodeSelector"] == {"cove.dev/ready": "true"}
    mutating = objects["MutatingWebhookConfiguration", "cove-mutating"]["webhooks"][0]
    assert mutating["failurePolicy"] == "Fail" and mutating["clientConfig"]["service"]["path"] == "/mutate"
    assert mutating["clientConfig"]["caBundle"]  # the self-signed CA when cert-manager is off
    excluded = mutating["namespaceSelector"]["matchExpressions"][0]
    assert excluded["operator"] == "NotIn" and "cove-system" in excluded["values"]


def test_chart_crds_are_the_operators(tmp_path):
    crds.write(tmp_path)
    for crd in crds.CRDS:
        name = f"{crd['metadata']['name']}.yaml"
        assert (CHART / "crds" / name).read_text() == (tmp_path / name).read_text(), (
            f"charts/cove/crds/{name} is stale: run `python -m cove.k8s.crds charts/cove/crds`"
        )


@pytest.mark.parametrize(
    "setting",
    [
        "devicePlugin.slots=0",
        "webhook.failurePolicy=Maybe",
        "colour=blue",
        "image.digest=md5:abc",
        "nodeAgent.mode=both",
        "webhook.kbs.url=ftp://kbs",
    ],
)
def test_schema_refuses_bad_values(helm, tmp_path, setting):
    proc = render(helm, None, tmp_path, "--set", setting)
    assert proc.returncode != 0 and "values don't meet the specifications of the schema" in proc.stderr
