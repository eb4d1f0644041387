"""The admission webhook's decisions: pure functions from an AdmissionReview to its answer.

A pod opts in with the label or annotation ``cove.dev/enclave: "true"``. The
mutating pass sets ``runtimeClassName: cove``, asks each container for one
``cove.dev/enclave`` and for its memory limit as ``cove.dev/enclave-memory``
(MiB, rounded up), and writes the key-broker settings as the annotations the
runtime reads (docs/formats/k8s-annotations.md). Both passes refuse opted-in
pods that would reach around the enclave: privileged containers, host
namespaces, added capabilities, any hostPath volume; and pods the webhook sees
that ask for a ``cove.dev/*`` resource without opting in.
Patches are computed against the pod as it is, so a second pass is empty.
The HTTP side is in webhook.py.
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from cove.decode import Fields, decode_json
from cove.k8s import DOMAIN, RUNTIME_CLASS

OPT_IN = f"{DOMAIN}/enclave"
ENCLAVE = f"{DOMAIN}/enclave"
ENCLAVE_MEMORY = f"{DOMAIN}/enclave-memory"
ANNOTATION_PREFIX = f"{DOMAIN}/"
TRUE = {"true", "yes", "1", "enabled"}
KBS_KEYS = {
    "url": "kbs-url",
    "ca": "kbs-ca",
    "policy": "kbs-policy",
    "timeout": "kbs-timeout",
    "retries": "kbs-retries",
    "resource_prefix": "kbs-resource-prefix",
}
CONTAINER_KINDS = ("initContainers", "containers", "ephemeralContainers")
# Annotations only the device plugin's Allocate writes (the runtime trusts them): a pod may not forge them.
RESERVED_ANNOTATIONS = (f"{DOMAIN}/enclave-slots", f"{DOMAIN}/enclave-memory-mib", f"{DOMAIN}/platform")
# A decoded JSON object (a pod, a review, a JSONPatch operation): checked where it is read.
JSONObject = dict[str, Any]


class BadReview(ValueError):
    """The request is not a well-formed AdmissionReview v1 for a Pod (the server answers 400)."""


@dataclass
class Settings:
    """What the webhook injects: key-broker settings and the memory of a pod without a limit."""

    kbs: dict[str, str] = field(default_factory=dict)  # keys of KBS_KEYS
    default_memory_mib: int = 256

    @classmethod
    def from_json(cls, text: str, default_memory_mib: int = 256) -> Settings:
        data = decode_json(text, ValueError, "the key-broker settings")
        if not isinstance(data, dict):
            raise ValueError("the key-broker settings must be a JSON object")
        unknown = sorted(set(data) - set(KBS_KEYS))
        if unknown:
            raise ValueError(f"unknown key-broker settings {unknown}; known: {sorted(KBS_KEYS)}")
        fields = Fields(data, "the key-broker setting", ValueError)
        values = {
            key: str(fields.value(key, (str, int, float, bool))) for key in data
        }  # numbers as the pod writes them
        if "url" in values and not values["url"].startswith(("https://", "http://")):
            raise ValueError(f"kbs url {values['url']!r} is not an http(s) URL")
        return cls(values, default_memory_mib)


def decode_review(body: bytes) -> object:
    """The request body as JSON; anything else (not UTF-8, malformed, nested too deep, trailing bytes) is BadReview."""

    def not_json(message: str) -> BadReview:
        return BadReview("the body is not JSON")  # the answer's words stay what they were; the cause is the body

    return decode_json(body, not_json, "the body", limit=len(body))


_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
_FACTORS: dict[str | None, Decimal | int] = {
    None: 1,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def quantity_bytes(text: str) -> int:
    """A Kubernetes resource quantity ("512Mi", "1G", "1.5Gi", "1e9") in bytes, rounded up."""
    match = _QUANTITY.match(str(text).strip())
    if not match:
        raise BadReview(f"memory quantity {text!r} is not a Kubernetes quantity")
    try:
        value = Decimal(match.group(1)) * _FACTORS[match.group(2)]
    except InvalidOperation:
        raise BadReview(f"memory quantity {text!r} is not a Kubernetes quantity") from None
    if value < 0:
        raise BadReview(f"memory quantity {text!r} is negative")
    return int(math.ceil(value))


def _pointer(*parts: str | int) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _opted_in(pod: JSONObject) -> bool:
    meta = pod.get("metadata") or {}
    return any(str((meta.get(where) or {}).get(OPT_IN, "")).lower() in TRUE for where in ("labels", "annotations"))


def _requests_cove(pod: JSONObject) -> list[str]:
    """The cove.dev/* resources any container of POD asks for (limits or requests)."""
    spec = pod.get("spec") or {}
    names: set[str] = set()
    for kind in CONTAINER_KINDS:
        for container in spec.get(kind) or []:
            resources = container.get("resources") or {}
            for section in ("limits", "requests"):
                wanted = resources.get(section) or {}
                if isinstance(wanted, dict):
                    names.update(str(name) for name in wanted if str(name).startswith(ANNOTATION_PREFIX))
    return sorted(names)


def refusals(pod: JSONObject) -> list[str]:
    """Why an opted-in pod may not run as an enclave (empty: it may)."""
    spec = pod.get("spec") or {}
    why = []
    for flag in ("hostPID", "hostNetwork", "hostIPC"):
        if spec.get(flag):
            why.append(f"{flag} shares the node's namespace with the enclave")
    runtime_class = spec.get("runtimeClassName")
    if runtime_class not in (None, RUNTIME_CLASS):
        why.append(f"runtimeClassName {runtime_class!r}: an enclave pod runs under {RUNTIME_CLASS!r}")
    for kind in CONTAINER_KINDS:
        for container in spec.get(kind) or []:
            name = container.get("name", "?")
            context = container.get("securityContext") or {}
            if context.get("privileged"):
                why.append(f"container {name!r} is privileged")
            added = ((context.get("capabilities") or {}).get("add")) or []
            if added:
                why.append(f"container {name!r} adds capabilities {sorted(map(str, added))}")
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    for key in RESERVED_ANNOTATIONS:
        if key in annotations:
            why.append(f"annotation {key} is the device plugin's to set")
    # Every hostPath, not only those over Cove's own paths: a path list is bypassed by
    # aliases (/var/run/cove, /proc/1/root/run/cove, a bind elsewhere), and cove-runtime
    # refuses a bind into an enclave anyway, so no enclave pod has a use for one.
    for volume in spec.get("volumes") or []:
        host = volume.get("hostPath") if isinstance(volume, dict) else None
        if host is not None:
            path = host.get("path") if isinstance(host, dict) else None
            why.append(
                f"volume {volume.get('name', '?')!r} mounts host path {path!r}: an enclave pod may have no hostPath"
            )
    return why


def _container_patch(container: JSONObject, index: int, kind: str, settings: Settings) -> list[JSONObject]:
    resources = container.get("resources") or {}
    limits = resources.get("limits") or {}
    requests = resources.get("requests") or {}
    memory = limits.get("memory") or requests.get("memory")
    mib = math.ceil(quantity_bytes(memory) / 2**20) if memory is not None else settings.default_memory_mib
    want = {ENCLAVE: "1", ENCLAVE_MEMORY: str(max(mib, 1))}
    base = ("spec", kind, index, "resources")
    ops: list[JSONObject] = []
    if "resources" not in container:
        return [{"op": "add", "path": _pointer(*base), "value": {"limits": want, "requests": dict(want)}}]
    for section, present in (("limits", limits), ("requests", requests)):
        if section not in resources:
            ops.append({"op": "add", "path": _pointer(*base, section), "value": dict(want)})
            continue
        for key, value in want.items():
            if str(present.get(key)) != value:
                ops.append(
                    {
                        "op": "replace" if key in present else "add",
                        "path": _pointer(*base, section, key),
                        "value": value,
                    }
                )
    return ops


def mutation(pod: JSONObject, settings: Settings) -> list[JSONObject]:
    """The JSONPatch that makes an opted-in pod an enclave pod; empty if it already is one."""
    spec = pod.get("spec") or {}
    ops: list[JSONObject] = []
    if spec.get("runtimeClassName") != RUNTIME_CLASS:
        ops.append({"op": "add", "path": "/spec/runtimeClassName", "value": RUNTIME_CLASS})
    for index, container in enumerate(spec.get("containers") or []):
        ops.extend(_container_patch(container, index, "containers", settings))
    annotations = (pod.get("metadata") or {}).get("annotations")
    want = {ANNOTATION_PREFIX + KBS_KEYS[k]: v for k, v in sorted(settings.kbs.items())}
    if annotations is None:
        if want:
            ops.append({"op": "add", "path": "/metadata/annotations", "value": want})
    else:
        for key, value in want.items():
            if annotations.get(key) != value:
                ops.append({"op": "add", "path": _pointer("metadata", "annotations", key), "value": value})
    return ops


def _request(review: object) -> JSONObject:
    if not isinstance(review, dict):
        raise BadReview("the body is not a JSON object")
    if review.get("apiVersion") != "admission.k8s.io/v1" or review.get("kind") != "AdmissionReview":
        raise BadReview("not an admission.k8s.io/v1 AdmissionReview")
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReview("the AdmissionReview has no request")
    if not isinstance(request.get("uid"), str) or not request["uid"]:
        raise BadReview("the request has no uid")
    return request


def _pod(request: JSONObject) -> JSONObject | None:
    """The pod under review, or None for what the webhook does not judge (other kinds, DELETE)."""
    kind = request.get("kind") or {}
    if not isinstance(kind, dict) or kind.get("kind") != "Pod" or request.get("operation") == "DELETE":
        return None
    if request.get("subResource") not in (None, "", "ephemeralcontainers"):
        return None
    pod = request.get("object")
    if not isinstance(pod, dict) or not isinstance(pod.get("spec"), dict):
        raise BadReview("the request has no Pod object with a spec")
    for kind_name in CONTAINER_KINDS:
        containers = pod["spec"].get(kind_name)
        if containers is not None and not (
            isinstance(containers, list) and all(isinstance(c, dict) for c in containers)
        ):
            raise BadReview(f"spec.{kind_name} is not a list of containers")
    return pod


def _answer(uid: str, allowed: bool, message: str | None = None, patch: list[JSONObject] | None = None) -> JSONObject:
    response: JSONObject = {"uid": uid, "allowed": allowed}
    if message:
        response["status"] = {"code": 403, "reason": "Forbidden", "message": message}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode()
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def review(body: object, settings: Settings, mutate: bool) -> JSONObject:
    """Answer one AdmissionReview: allowed, refused with the reasons, or allowed with a patch."""
    request = _request(body)
    uid = request["uid"]
    pod = _pod(request)
    if pod is None:
        return _answer(uid, True)
    if not _opted_in(pod):
        # Slots are for enclave pods: one that asks for them without opting in (say with
        # cove.dev/enclave: "false") would run under runc and only take a slot away.
        wanted = _requests_cove(pod)
        if wanted:
            return _answer(
                uid,
                False,
                f"Cove refuses this pod: it requests {', '.join(wanted)} but is not an enclave pod "
                f'(set {OPT_IN}: "true")',
            )
        return _answer(uid, True)
    why = refusals(pod)
    if why:
        return _answer(uid, False, "Cove refuses this enclave pod: " + "; ".join(why))
    if not mutate or request.get("operation") != "CREATE":
        return _answer(uid, True)
    return _answer(uid, True, patch=mutation(pod, settings))
