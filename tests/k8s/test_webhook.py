"""The admission webhook over real HTTPS with AdmissionReview v1 documents."""

from __future__ import annotations

import base64
import copy
import json
import ssl
import subprocess
import time

import httpx
import jsonpatch
import kubernetes_validate
import pytest

from cove.k8s import admission
from tests.conftest import COVE
from tests.k8s.conftest import free_port

KBS = {
    "url": "https://kbs.cove-system.svc:8443",
    "ca": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    "timeout": "10",
}
K8S_VERSIONS = ["1.30", "1.34"]


def pod(opt_in: str | None = "label", **spec_extra) -> dict:
    meta = {"name": "app", "namespace": "default", "labels": {"app": "web"}}
    if opt_in == "label":
        meta["labels"]["cove.dev/enclave"] = "true"
    elif opt_in == "annotation":
        meta["annotations"] = {"cove.dev/enclave": "true", "team": "payments"}
    spec = {
        "containers": [
            {
                "name": "app",
                "image": "registry.example/app:1",
                "resources": {"limits": {"memory": "512Mi", "cpu": "1"}},
            },
            {"name": "sidecar", "image": "registry.example/side:1"},
        ]
    }
    spec.update(spec_extra)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def review(obj: dict, operation: str = "CREATE", uid: str = "b1d0c1a0-0000-4000-8000-000000000001") -> dict:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "default",
            "operation": operation,
            "object": obj,
            "userInfo": {"username": "alice"},
        },
    }


@pytest.fixture(scope="module")
def hook(tls, tmp_path_factory):
    settings = tmp_path_factory.mktemp("kbs") / "kbs.json"
    settings.write_text(json.dumps(KBS))
    port = free_port()
    proc = subprocess.Popen(
        [
            COVE,
            "k8s",
            "webhook",
            "--listen",
            f"127.0.0.1:{port}",
            "--cert",
            str(tls["cert"]),
            "--key",
            str(tls["key"]),
            "--kbs-config",
            str(settings),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    client = httpx.Client(
        base_url=f"https://127.0.0.1:{port}", verify=ssl.create_default_context(cafile=str(tls["ca"])), timeout=10
    )
    for _ in range(200):
        try:
            client.get("/healthz")
            break
        except httpx.TransportError:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
    yield {"client": client, "settings": settings}
    client.close()
    proc.terminate()
    proc.wait(timeout=10)


def post(hook, body, endpoint: str = "/mutate") -> dict:
    answer = hook["client"].post(endpoint, json=body)
    assert answer.status_code == 200, answer.text
    document = answer.json()
    assert document["apiVersion"] == "admission.k8s.io/v1" and document["kind"] == "AdmissionReview"
    assert document["response"]["uid"] == body["request"]["uid"]
    return document["response"]


def apply(obj: dict, response: dict) -> dict:
    assert response["allowed"], response
    if "patch" not in response:
        return obj
    assert response["patchType"] == "JSONPatch"
    return jsonpatch.apply_patch(obj, json.loads(base64.b64decode(response["patch"])))


def test_opted_out_pod_is_untouched(hook):
    response = post(hook, review(pod(opt_in=None, hostNetwork=True)))
    assert response["allowed"] and "patch" not in response


@pytest.mark.parametrize("opt_in", ["label", "annotation"])
def test_opted_in_pod_becomes_an_enclave_pod(hook, opt_in):
    original = pod(opt_in)
    patched = apply(original, post(hook, review(copy.deepcopy(original))))
    assert patched["spec"]["runtimeClassName"] == "cove"
    app, side = patched["spec"]["containers"]
    assert app["resources"]["limits"] == {
        "memory": "512Mi",
        "cpu": "1",
        "cove.dev/enclave": "1",
        "cove.dev/enclave-memory": "512",
    }
    assert app["resources"]["requests"] == {"cove.dev/enclave": "1", "cove.dev/enclave-memory": "512"}
    assert side["resources"]["limits"] == {"cove.dev/enclave": "1", "cove.dev/enclave-memory": "256"}
    annotations = patched["metadata"]["annotations"]
    assert annotations["cove.dev/kbs-url"] == KBS["url"] and annotations["cove.dev/kbs-ca"] == KBS["ca"]
    assert annotations["cove.dev/kbs-timeout"] == "10"
    if opt_in == "annotation":
        assert annotations["team"] == "payments"
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(patched, version, strict=True)
    again = post(hook, review(copy.deepcopy(patched)))  # idempotent: a second pass changes nothing
    assert again["allowed"] and "patch" not in again
    assert post(hook, review(patched), "/validate")["allowed"]


@pytest.mark.parametrize(
    "memory,mib", [("1Gi", "1024"), ("1G", "954"), ("100M", "96"), ("1.5Gi", "1536"), ("1e9", "954"), ("1", "1")]
)
def test_memory_quantities_round_up_to_mib(hook, memory, mib):
    original = pod(containers=[{"name": "a", "image": "x", "resources": {"requests": {"memory": memory}}}])
    patched = apply(original, post(hook, review(original)))
    assert patched["spec"]["containers"][0]["resources"]["limits"]["cove.dev/enclave-memory"] == mib


REFUSED = {
    "privileged": {"containers": [{"name": "a", "image": "x", "securityContext": {"privileged": True}}]},
    "init-privileged": {
        "initContainers": [{"name": "i", "image": "x", "securityContext": {"privileged": True}}],
        "containers": [{"name": "a", "image": "x"}],
    },
    "hostPID": {"hostPID": True},
    "hostNetwork": {"hostNetwork": True},
    "hostIPC": {"hostIPC": True},
    "capabilities": {
        "containers": [{"name": "a", "image": "x", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}]
    },
    "hostPath-socket": {"volumes": [{"name": "v", "hostPath": {"path": "/run/cove/cove.sock"}}]},
    "hostPath-parent": {"volumes": [{"name": "v", "hostPath": {"path": "/run/"}}]},
    "hostPath-root": {"volumes": [{"name": "v", "hostPath": {"path": "/"}}]},
    "hostPath-dotdot": {"volumes": [{"name": "v", "hostPath": {"path": "/tmp/../var/lib/cove"}}]},
    "hostPath-plugins": {"volumes": [{"name": "v", "hostPath": {"path": "/var/lib/kubelet"}}]},
    # Aliases of Cove's paths, which a list of protected paths let through (L4): every hostPath is refused now.
    "hostPath-var-run": {"volumes": [{"name": "v", "hostPath": {"path": "/var/run/cove"}}]},
    "hostPath-proc-root": {"volumes": [{"name": "v", "hostPath": {"path": "/proc/1/root/run/cove"}}]},
    "hostPath-runtime": {"volumes": [{"name": "v", "hostPath": {"path": "/run/cove-runtime"}}]},
    "hostPath-unrelated": {"volumes": [{"name": "v", "hostPath": {"path": "/srv/data"}}]},
    "hostPath-no-path": {"volumes": [{"name": "v", "hostPath": {}}]},
    "other-runtime": {"runtimeClassName": "runc"},
}


@pytest.mark.parametrize("endpoint", ["/mutate", "/validate"])
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_opted_in_pod_reaching_around_the_enclave_is_refused(hook, case, endpoint):
    response = post(hook, review(pod(**REFUSED[case])), endpoint)
    assert not response["allowed"] and "patch" not in response
    assert response["status"]["code"] == 403 and "Cove refuses" in response["status"]["message"]


@pytest.mark.parametrize("key", ["cove.dev/enclave-slots", "cove.dev/enclave-memory-mib", "cove.dev/platform"])
def test_forged_device_plugin_annotations_are_refused(hook, key):
    forged = pod("annotation")
    forged["metadata"]["annotations"][key] = "tpm"
    for endpoint in ("/mutate", "/validate"):
        response = post(hook, review(forged), endpoint)
        assert not response["allowed"] and key in response["status"]["message"]


def test_other_volumes_are_allowed(hook):
    original = pod(volumes=[{"name": "data", "emptyDir": {}}, {"name": "conf", "configMap": {"name": "c"}}])
    assert apply(original, post(hook, review(original)))["spec"]["runtimeClassName"] == "cove"


@pytest.mark.parametrize("section", ["limits", "requests"])
@pytest.mark.parametrize("resource", ["cove.dev/enclave", "cove.dev/tpm"])
def test_pod_asking_for_cove_resources_without_opting_in_is_refused(hook, section, resource):
    """A pod the webhook sees (label present, not "true") may not take enclave slots and run under runc."""
    opted_out = pod(opt_in=None)
    opted_out["metadata"]["labels"]["cove.dev/enclave"] = "false"
    opted_out["spec"]["containers"][1]["resources"] = {section: {resource: "1"}}
    for endpoint in ("/mutate", "/validate"):
        response = post(hook, review(copy.deepcopy(opted_out)), endpoint)
        assert not response["allowed"] and resource in response["status"]["message"]
    del opted_out["spec"]["containers"][1]["resources"]
    assert post(hook, review(opted_out))["allowed"]


def test_settings_file_is_reread(hook):
    settings = hook["settings"]
    settings.write_text(json.dumps(dict(KBS, url="https://kbs-2.cove-system.svc:8443")))
    try:
        patched = apply(pod(), post(hook, review(pod())))
        assert patched["metadata"]["annotations"]["cove.dev/kbs-url"] == "https://kbs-2.cove-system.svc:8443"
        settings.write_text("{not json")  # a broken ConfigMap: fail closed with a reason, not a wrong pod
        answer = hook["client"].post("/mutate", json=review(pod()))
        assert answer.status_code == 500 and "settings" in answer.json()["error"]
    finally:
        settings.write_text(json.dumps(KBS))


def _without(path: tuple, value=None) -> dict:
    body = review(pod())
    target = body
    for key in path[:-1]:
        target = target[key]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return body


MALFORMED = {
    "not-json": b'{"apiVersion": ',
    "array": b"[]",
    "wrong-kind": json.dumps(_without(("kind",), "Pod")).encode(),
    "v1beta1": json.dumps(_without(("apiVersion",), "admission.k8s.io/v1beta1")).encode(),
    "no-request": json.dumps(_without(("request",))).encode(),
    "no-uid": json.dumps(_without(("request", "uid"))).encode(),
    "no-object": json.dumps(_without(("request", "object"))).encode(),
    "no-spec": json.dumps(_without(("request", "object", "spec"))).encode(),
    "containers-not-list": json.dumps(_without(("request", "object", "spec", "containers"), "x")).encode(),
    "bad-quantity": json.dumps(
        review(pod(containers=[{"name": "a", "image": "x", "resources": {"limits": {"memory": "lots"}}}]))
    ).encode(),
    "not-utf8": b"\xff\xfe{}",
    "deep-nesting": b"[" * 100_000 + b"]" * 100_000,  # was a RecursionError: a 500 with a traceback in the log
    "trailing-garbage": json.dumps(review(pod())).encode() + b" {}",
    "uid-not-text": json.dumps(_without(("request", "uid"), 7)).encode(),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_review_is_400(hook, case):
    answer = hook["client"].post("/mutate", content=MALFORMED[case], headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"]


SETTINGS = {
    "deep nesting": ('{"url": ' + "[" * 100_000 + "]" * 100_000 + "}", "not valid JSON"),
    "trailing garbage": (json.dumps(KBS) + " {}", "not valid JSON"),
    "wrong top-level type": (json.dumps([KBS]), "must be a JSON object"),
    "wrong field type": (json.dumps(dict(KBS, timeout={"seconds": 10})), "timeout must be"),
    "null value": (json.dumps(dict(KBS, ca=None)), "ca must be"),
    "unknown key": (json.dumps(dict(KBS, proxy="x")), "unknown key-broker settings"),
}


@pytest.mark.parametrize("case", SETTINGS)
def test_hostile_key_broker_settings_are_one_value_error(case):
    """The mounted settings file goes through cove.decode: each is a ValueError (the webhook answers 500 with it)."""
    text, words = SETTINGS[case]
    with pytest.raises(ValueError, match=words):
        admission.Settings.from_json(text)
    assert admission.Settings.from_json(json.dumps(dict(KBS, retries=3))).kbs["retries"] == "3"  # numbers as before


def test_oversized_review_is_413(hook):
    answer = hook["client"].post(
        "/mutate", content=b"{" + b" " * (4 * 2**20) + b"}", headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 413


def test_metrics_count_decisions(hook):
    post(hook, review(pod(hostPID=True)))
    text = hook["client"].get("/metrics").text
    assert 'cove_webhook_reviews_total{decision="refused",endpoint="mutate"}' in text


@pytest.mark.parametrize(
    "args,words",
    [
        (["--cert", "/nonexistent/tls.crt", "--key", "/nonexistent/tls.key"], "cannot read /nonexistent/tls.crt"),
        (["--listen", "nowhere"], "is not HOST:PORT"),
        (["--kbs-config", "BAD"], "--kbs-config"),
    ],
)
def test_bad_startup_is_one_line(tls, tmp_path, args, words):
    bad = tmp_path / "kbs.json"
    bad.write_text(json.dumps({"url": "ftp://x", "colour": "blue"}))
    full = ["--cert", str(tls["cert"]), "--key", str(tls["key"])] + [str(bad) if a == "BAD" else a for a in args]
    proc = subprocess.run([COVE, "k8s", "webhook", *full], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and words in proc.stderr and "Traceback" not in proc.stderr
