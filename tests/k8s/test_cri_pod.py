"""A pod the webhook made, run the way a kubelet would: containerd's CRI with the RuntimeClass's handler.

The pod goes through the admission webhook's decision, its patch is applied,
and the result is translated to CRI calls as the kubelet does (runtimeClassName
→ the RuntimeClass's handler, pod annotations → sandbox annotations, the memory
limit → the container's cgroup limit, the device plugin's Allocate answer →
the container's environment, mounts and annotations), against the OCI issue's
containerd node.
"""

from __future__ import annotations

import base64
import json
import time

import jsonpatch

from cove.k8s import admission, deviceplugin
from cove.oci.proto.runtime.v1 import api_pb2 as cri
from tests.k8s.test_webhook import review
from tests.oci.conftest import oci_instance, oci_tar  # noqa: F401  (fixtures)
from tests.oci.test_cri import HELLO, cri_node, pause_tar  # noqa: F401  (fixtures)

RUNTIME_CLASSES = {"cove": "cove"}  # the chart's RuntimeClass: name cove, handler cove


def _webhook_pod() -> dict:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "hello",
            "namespace": "default",
            "uid": "uid-hello",
            "labels": {"cove.dev/enclave": "true"},
        },
        "spec": {
            "containers": [
                {
                    "name": "hello",
                    "image": HELLO,
                    "command": ["/bin/sh"],
                    "args": ["-c", "cat /dev/attestation/attestation_type; exit 4"],
                    # 256Mi: the runtime joins the container's cgroup only after
                    # `start`, so its own start is not charged to it (docs/kubernetes.md)
                    "resources": {"limits": {"memory": "256Mi"}},
                }
            ]
        },
    }
    settings = admission.Settings({"url": "https://kbs.cove-system.svc:8443", "timeout": "10"})
    response = admission.review(review(pod), settings, mutate=True)["response"]
    assert response["allowed"]
    return jsonpatch.apply_patch(pod, json.loads(base64.b64decode(response["patch"])))


def test_a_webhook_made_pod_runs_under_the_cove_handler(cri_node, tmp_path):
    daemon, runtime = cri_node
    pod = _webhook_pod()
    handler = RUNTIME_CLASSES[pod["spec"]["runtimeClassName"]]
    meta, spec = pod["metadata"], pod["spec"]
    host = cri.NamespaceOption(network=cri.NamespaceMode.NODE, pid=cri.NamespaceMode.CONTAINER)
    sandbox_config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=meta["name"], uid=meta["uid"], namespace=meta["namespace"]),
        hostname=meta["name"],
        log_directory=str(tmp_path / "logs"),
        labels=meta["labels"],
        annotations=meta["annotations"],
        linux=cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(namespace_options=host)),
    )
    sandbox = runtime.RunPodSandbox(
        cri.RunPodSandboxRequest(config=sandbox_config, runtime_handler=handler), timeout=120
    ).pod_sandbox_id
    try:
        status = runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox), timeout=30).status
        assert status.runtime_handler == "cove"
        assert status.annotations["cove.dev/kbs-url"] == "https://kbs.cove-system.svc:8443"
        container = spec["containers"][0]
        limits = container["resources"]["limits"]
        assert limits["cove.dev/enclave"] == "1" and limits["cove.dev/enclave-memory"] == "256"
        # What the kubelet adds from the device plugin's Allocate for cove.dev/enclave: its
        # environment, mounts and annotations must pass cove-runtime's checks (a bind of the
        # node service's run folder did not: oci/spec refuses every bind into an enclave).
        plugin = next(r for r in deviceplugin.resources(deviceplugin.Config()) if r.name == "cove.dev/enclave")
        allocated = plugin.allocate(["enclave-0"])
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=container["name"]),
            image=cri.ImageSpec(image=container["image"]),
            command=container["command"],
            args=container["args"],
            envs=[
                cri.KeyValue(key=k, value=v.encode()) for k, v in sorted(allocated.envs.items())
            ],  # bytes in this proto
            mounts=[
                cri.Mount(container_path=m.container_path, host_path=m.host_path, readonly=m.read_only)
                for m in allocated.mounts
            ],
            devices=[
                cri.Device(container_path=d.container_path, host_path=d.host_path, permissions=d.permissions)
                for d in allocated.devices
            ],
            log_path="hello.log",
            annotations={**meta["annotations"], **allocated.annotations},
            linux=cri.LinuxContainerConfig(
                resources=cri.LinuxContainerResources(memory_limit_in_bytes=admission.quantity_bytes(limits["memory"])),
                security_context=cri.LinuxContainerSecurityContext(namespace_options=host),
            ),
        )
        created = runtime.CreateContainer(
            cri.CreateContainerRequest(pod_sandbox_id=sandbox, config=config, sandbox_config=sandbox_config),
            timeout=120,
        ).container_id
        runtime.StartContainer(cri.StartContainerRequest(container_id=created), timeout=120)
        for _ in range(600):
            state = runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=created), timeout=30).status
            if state.state == cri.ContainerState.CONTAINER_EXITED:
                break
            time.sleep(0.05)
        assert state.state == cri.ContainerState.CONTAINER_EXITED and state.exit_code == 4
        log = (tmp_path / "logs" / "hello.log").read_text().splitlines()
        assert [line.split(" ", 3)[3] for line in log] == ["cove"]  # /dev/attestation inside: a Cove enclave
        runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=created), timeout=60)
    finally:
        runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sandbox), timeout=60)
        runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox), timeout=60)
