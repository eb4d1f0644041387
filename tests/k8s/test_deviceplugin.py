"""The device plugin against a fake kubelet: a real gRPC server on a real unix socket, the vendored v1beta1 proto."""

from __future__ import annotations

import queue
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from cove.k8s.proto.deviceplugin.v1beta1 import api_pb2 as pb
from tests.conftest import COVE, require
from tests.k8s.fakes import FakeDaemon, FakeKubelet

ENCLAVE, MEMORY, TPM = "cove.dev/enclave", "cove.dev/enclave-memory", "cove.dev/tpm"


def _health(updates: queue.Queue, timeout: float = 15) -> set[str]:
    response = updates.get(timeout=timeout)
    assert response is not None, "ListAndWatch ended"
    return {device.health for device in response.devices}


@pytest.fixture(scope="module")
def node():
    """A plugin folder with a fake kubelet, a fake node service, and `cove k8s device-plugin` running."""
    folder = Path(tempfile.mkdtemp(prefix="k8s-dp-", dir="/tmp"))
    plugins = folder / "device-plugins"
    plugins.mkdir()
    daemon = FakeDaemon(folder / "cove.sock")
    daemon.start()
    kubelet = FakeKubelet(plugins)
    kubelet.start()
    proc = subprocess.Popen(
        [
            COVE,
            "k8s",
            "device-plugin",
            "--slots",
            "4",
            "--memory-mib",
            "16",
            "--tpm",
            "yes",
            "--plugin-dir",
            str(plugins),
            "--run-dir",
            str(folder),
            "--health-interval",
            "0.1",
        ],
        stderr=subprocess.PIPE,
        text=True,
        umask=0,  # the plugin sockets' mode must not depend on the umask it was started with
    )
    try:
        requests = kubelet.wait_registered(3)
        yield {"kubelet": kubelet, "daemon": daemon, "requests": requests, "proc": proc, "folder": folder}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        finally:
            kubelet.stop()
            daemon.stop()
            shutil.rmtree(folder, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr.read()


def test_registers_each_resource_on_its_own_socket(node):
    by_name = {r.resource_name: r for r in node["requests"]}
    assert set(by_name) == {ENCLAVE, MEMORY, TPM}
    assert len({r.endpoint for r in by_name.values()}) == 3
    for request in by_name.values():
        assert request.version == "v1beta1"
        assert request.options.pre_start_required and request.options.get_preferred_allocation_available
    stub = node["kubelet"].stubs[ENCLAVE]
    assert stub.GetDevicePluginOptions(pb.Empty()).get_preferred_allocation_available


def test_list_and_watch_follows_the_node_service(node):
    kubelet, daemon = node["kubelet"], node["daemon"]
    first = kubelet.updates[ENCLAVE].get(timeout=10)
    assert [d.ID for d in first.devices] == [f"enclave-{i}" for i in range(4)]
    assert {d.health for d in first.devices} == {"Healthy"}
    assert len(kubelet.updates[MEMORY].get(timeout=10).devices) == 16
    kubelet.updates[TPM].get(timeout=10)
    daemon.stop()  # the node service goes away: every resource turns Unhealthy
    for resource in (ENCLAVE, MEMORY, TPM):
        assert _health(kubelet.updates[resource]) == {"Unhealthy"}
    with pytest.raises(grpc.RpcError) as refused:
        kubelet.stubs[ENCLAVE].PreStartContainer(pb.PreStartContainerRequest(devices_ids=["enclave-0"]))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    daemon.start()
    for resource in (ENCLAVE, MEMORY, TPM):
        assert _health(kubelet.updates[resource]) == {"Healthy"}
    kubelet.stubs[ENCLAVE].PreStartContainer(pb.PreStartContainerRequest(devices_ids=["enclave-0"]))


@pytest.mark.parametrize("ids", [["enclave-2"], ["enclave-0", "enclave-1", "enclave-3"]], ids=["one", "three"])
def test_allocate_hands_the_container_slots_and_nothing_of_the_node_service(node, ids):
    """Any pod may request cove.dev/enclave: it gets no node-service socket, no bind, no device (H2)."""
    request = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=ids)])
    answer = node["kubelet"].stubs[ENCLAVE].Allocate(request).container_responses[0]
    assert dict(answer.envs) == {"COVE_ENCLAVE_SLOTS": ",".join(ids)}
    assert dict(answer.annotations) == {"cove.dev/enclave-slots": ",".join(ids)}
    assert not answer.mounts and not answer.devices and not answer.cdi_devices
    assert str(node["folder"]) not in str(answer)  # the run folder (the node service's socket) appears nowhere


def test_plugin_sockets_are_for_root_only(node):
    """0600 whatever the umask (the fixture starts the plugin with umask 0): only the kubelet connects (L7)."""
    folder = node["folder"] / "device-plugins"
    for request in node["requests"]:
        mode = (folder / request.endpoint).stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)


def test_allocate_memory_and_tpm(node):
    stubs = node["kubelet"].stubs
    ids = [f"mib-{i}" for i in range(8)]
    memory = (
        stubs[MEMORY]
        .Allocate(pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=ids)]))
        .container_responses[0]
    )
    assert memory.envs["COVE_ENCLAVE_MEMORY_MIB"] == "8"
    tpm = (
        stubs[TPM]
        .Allocate(pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=["tpm-1"])]))
        .container_responses[0]
    )
    assert tpm.annotations["cove.dev/platform"] == "tpm" and not tpm.devices


@pytest.mark.parametrize("ids", [["enclave-99"], ["../../etc/passwd"], []], ids=["unknown", "hostile", "empty"])
def test_allocate_refuses_devices_it_does_not_have(node, ids):
    request = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=ids)])
    with pytest.raises(grpc.RpcError) as refused:
        node["kubelet"].stubs[ENCLAVE].Allocate(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_preferred_allocation_packs(node):
    request = pb.PreferredAllocationRequest(
        container_requests=[
            pb.ContainerPreferredAllocationRequest(
                available_deviceIDs=["enclave-3", "enclave-1", "enclave-2", "enclave-0"],
                must_include_deviceIDs=["enclave-3"],
                allocation_size=3,
            )
        ]
    )
    answer = node["kubelet"].stubs[ENCLAVE].GetPreferredAllocation(request)
    assert list(answer.container_responses[0].deviceIDs) == ["enclave-3", "enclave-0", "enclave-1"]


def test_kubelet_restart_and_a_vanished_socket_mean_registering_again(node):
    """Runs last in this module: the kubelet goes away (its socket and ours deleted), then comes back."""
    kubelet = node["kubelet"]
    kubelet.stop(wipe=True)
    time.sleep(0.5)  # no kubelet socket at all for a while: the plugin waits, it does not exit
    assert node["proc"].poll() is None
    kubelet.start()
    again = kubelet.wait_registered(3)
    assert {r.resource_name for r in again} == {ENCLAVE, MEMORY, TPM}
    assert _health(kubelet.updates[ENCLAVE]) == {"Healthy"}
    answer = kubelet.stubs[ENCLAVE].Allocate(
        pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=["enclave-0"])])
    )
    assert answer.container_responses[0].envs["COVE_ENCLAVE_SLOTS"] == "enclave-0"


@pytest.mark.parametrize("args", [["--slots", "0"], ["--memory-mib", "-1"], ["--tpm", "maybe"]])
def test_bad_options_are_one_line(args):
    proc = subprocess.run([COVE, "k8s", "device-plugin", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_health_probe_speaks_to_the_real_node_service():
    """The probe the plugin and the node agent use, against `cove daemon` itself (docs/formats/daemon-api.md)."""
    from cove.k8s.health import DaemonProbe

    folder = Path(tempfile.mkdtemp(prefix="k8s-dmn-", dir="/tmp"))
    probe = DaemonProbe(str(folder / "cove.sock"), timeout=2)
    assert not probe().up and "no socket" in probe().detail
    proc = subprocess.Popen(
        [COVE, "daemon", "--root", str(folder / "root"), "--socket", str(folder / "cove.sock")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (health := probe()).up:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, health.detail
            time.sleep(0.05)
        assert health.info["version"] and health.info["api"] == "v1"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        # The node's /dev/attestation server outlives the daemon by design; unmounting ends it.
        mount = folder / "root" / "attestation"
        if any(line.split()[1] == str(mount) for line in Path("/proc/mounts").read_text().splitlines()):
            subprocess.run([require("fusermount3"), "-u", str(mount)], check=True)
        shutil.rmtree(folder, ignore_errors=True)
    assert not probe().up
