"""The kubelet device plugin (API v1beta1 over gRPC on unix sockets).

One process serves one plugin per resource, each on its own socket in the
kubelet's device-plugin folder, because the kubelet binds one resource name to
one endpoint:

- ``cove.dev/enclave``: enclave slots on this node (``--slots``);
- ``cove.dev/enclave-memory``: MiB the node gives enclaves, one device per MiB
  (as EPC is counted for SGX);
- ``cove.dev/tpm``: advertised only where the platform key is TPM-rooted; the
  TPM stays with the node service, a pod gets the right to a TPM-rooted
  report, never the TPM device.

Health follows the node service: a daemon that does not answer turns every
device Unhealthy through ListAndWatch, and PreStartContainer refuses. The
kubelet deletes plugin sockets and recreates its own when it restarts; the
watch loop sees either and registers again. docs/kubernetes.md has the why,
docs/formats/k8s-annotations.md what Allocate hands a container.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator

import grpc

from cove import util
from cove.k8s import DOMAIN
from cove.k8s.health import DaemonProbe, Health
from cove.k8s.proto.deviceplugin.v1beta1 import api_pb2 as pb
from cove.k8s.proto.deviceplugin.v1beta1 import api_pb2_grpc as pb_grpc

API_VERSION = "v1beta1"
PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
KUBELET_SOCKET = "kubelet.sock"
HEALTHY, UNHEALTHY = "Healthy", "Unhealthy"
RUN_DIR = "/run/cove"  # the node service's socket lives here (probed for health, never handed to a pod)
SOCKET_MODE = 0o600  # the plugin sockets: the kubelet (root) only

log = logging.getLogger("cove.k8s.deviceplugin")


@dataclass(frozen=True)
class Resource:
    """One advertised resource: its name, device ids, and what Allocate hands a container."""

    name: str  # e.g. cove.dev/enclave
    endpoint: str  # socket file name inside the plugin folder
    device_ids: tuple[str, ...]
    allocate: Callable[[list[str]], pb.ContainerAllocateResponse]


@dataclass
class Config:
    slots: int = 8
    memory_mib: int = 0
    tpm: bool = False
    plugin_dir: str = PLUGIN_DIR
    daemon_socket: str | None = None
    run_dir: str = RUN_DIR
    health_interval: float = 5.0
    extra: dict[str, str] = field(default_factory=dict)


def _enclave_allocate(ids: list[str]) -> pb.ContainerAllocateResponse:
    """The slot ids only: no node-service socket and no bind of its run folder.

    Any pod may request the resource, labelled or not, and a read-only bind
    still lets a process connect() to a unix socket: uid 0 in the container
    would be root to the node service. cove-runtime runs on the host and
    reaches the node service itself, so the container needs neither.
    """
    return pb.ContainerAllocateResponse(
        envs={"COVE_ENCLAVE_SLOTS": ",".join(ids)}, annotations={f"{DOMAIN}/enclave-slots": ",".join(ids)}
    )


def _memory_allocate(ids: list[str]) -> pb.ContainerAllocateResponse:
    return pb.ContainerAllocateResponse(
        envs={"COVE_ENCLAVE_MEMORY_MIB": str(len(ids))}, annotations={f"{DOMAIN}/enclave-memory-mib": str(len(ids))}
    )


def _tpm_allocate(ids: list[str]) -> pb.ContainerAllocateResponse:
    return pb.ContainerAllocateResponse(envs={"COVE_PLATFORM_TPM": "1"}, annotations={f"{DOMAIN}/platform": "tpm"})


def resources(config: Config) -> list[Resource]:
    """The resources this node advertises, from the configuration."""
    found = [
        Resource(
            f"{DOMAIN}/enclave",
            "cove-enclave.sock",
            tuple(f"enclave-{i}" for i in range(config.slots)),
            _enclave_allocate,
        )
    ]
    if config.memory_mib:
        found.append(
            Resource(
                f"{DOMAIN}/enclave-memory",
                "cove-enclave-memory.sock",
                tuple(f"mib-{i}" for i in range(config.memory_mib)),
                _memory_allocate,
            )
        )
    if config.tpm:
        found.append(
            Resource(f"{DOMAIN}/tpm", "cove-tpm.sock", tuple(f"tpm-{i}" for i in range(config.slots)), _tpm_allocate)
        )
    return found


class HealthState:
    """The node service's health, shared by every plugin's ListAndWatch streams."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._healthy = False
        self._generation = 0
        self._closed = False

    @property
    def healthy(self) -> bool:
        return self._healthy

    def set(self, healthy: bool) -> None:
        with self._cond:
            if healthy != self._healthy:
                self._healthy = healthy
                self._generation += 1
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_change(self, generation: int, timeout: float) -> tuple[int, bool]:
        """Block until the generation moves past GENERATION or the state closes; (generation, closed)."""
        with self._cond:
            self._cond.wait_for(lambda: self._generation != generation or self._closed, timeout)
            return self._generation, self._closed

    @property
    def generation(self) -> int:
        return self._generation


class DevicePluginServicer(pb_grpc.DevicePluginServicer):
    """The DevicePlugin service for one resource."""

    def __init__(self, resource: Resource, health: HealthState):
        self.resource = resource
        self.health = health
        self._ids = frozenset(resource.device_ids)

    def _devices(self) -> list[pb.Device]:
        state = HEALTHY if self.health.healthy else UNHEALTHY
        return [pb.Device(ID=i, health=state) for i in self.resource.device_ids]

    def GetDevicePluginOptions(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.DevicePluginOptions:
        return pb.DevicePluginOptions(pre_start_required=True, get_preferred_allocation_available=True)

    def ListAndWatch(self, request: pb.Empty, context: grpc.ServicerContext) -> Iterator[pb.ListAndWatchResponse]:
        generation = self.health.generation
        yield pb.ListAndWatchResponse(devices=self._devices())
        while context.is_active():
            new, closed = self.health.wait_change(generation, timeout=1.0)
            if closed:
                return
            if new != generation:
                generation = new
                yield pb.ListAndWatchResponse(devices=self._devices())

    def GetPreferredAllocation(
        self, request: pb.PreferredAllocationRequest, context: grpc.ServicerContext
    ) -> pb.PreferredAllocationResponse:
        """Pack: the devices that must be included, then the lowest-numbered available ones."""
        order = {device: n for n, device in enumerate(self.resource.device_ids)}
        answers = []
        for want in request.container_requests:
            chosen = [d for d in want.must_include_deviceIDs if d in order]
            rest = sorted(
                (d for d in want.available_deviceIDs if d in order and d not in chosen), key=order.__getitem__
            )
            chosen.extend(rest[: max(0, want.allocation_size - len(chosen))])
            answers.append(pb.ContainerPreferredAllocationResponse(deviceIDs=chosen))
        return pb.PreferredAllocationResponse(container_responses=answers)

    def Allocate(self, request: pb.AllocateRequest, context: grpc.ServicerContext) -> pb.AllocateResponse:
        answers = []
        for want in request.container_requests:
            ids = list(want.devices_ids)
            unknown = sorted(set(ids) - self._ids)
            if not ids or unknown:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{self.resource.name}: unknown device ids {unknown}"
                    if unknown
                    else f"{self.resource.name}: no device ids in the request",
                )
            answers.append(self.resource.allocate(ids))
        return pb.AllocateResponse(container_responses=answers)

    def PreStartContainer(
        self, request: pb.PreStartContainerRequest, context: grpc.ServicerContext
    ) -> pb.PreStartContainerResponse:
        if not self.health.healthy:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the Cove node service is not answering")
        return pb.PreStartContainerResponse()


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISSOCK(info.st_mode) else None


class DevicePlugin:
    """Serves every resource, registers with the kubelet, follows health and kubelet restarts."""

    def __init__(self, config: Config, probe: Callable[[], Health] | None = None):
        self.config = config
        self.probe = probe or DaemonProbe(config.daemon_socket or str(Path(config.run_dir) / "cove.sock"))
        self.health = HealthState()
        self.resources = resources(config)
        self.folder = Path(config.plugin_dir)
        self._stop = util.Wakeup()  # stop() is called from a signal handler (cove.util.Wakeup says why)
        self._servers: list[grpc.Server] = []
        self.registrations = 0  # how many times every resource was registered (for logs and tests)

    def stop(self) -> None:
        self._stop.set()

    def _probe(self) -> None:
        result = self.probe()
        if result.up != self.health.healthy:
            log.info("node service %s: %s", "up" if result.up else "down", result.detail)
        self.health.set(result.up)

    def _serve(self) -> None:
        for resource in self.resources:
            path = self.folder / resource.endpoint
            path.unlink(missing_ok=True)
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
            pb_grpc.add_DevicePluginServicer_to_server(DevicePluginServicer(resource, self.health), server)
            # Only root (the kubelet) may connect: the socket is made 0600 under a tight umask,
            # then set explicitly, whatever umask the process was started with.
            previous = os.umask(0o177)
            try:
                server.add_insecure_port(f"unix://{path}")
                server.start()
            finally:
                os.umask(previous)
            self._servers.append(server)
            os.chmod(path, SOCKET_MODE)

    def _shutdown(self) -> None:
        for server in self._servers:
            server.stop(grace=0.5)
        self._servers.clear()
        for resource in self.resources:
            (self.folder / resource.endpoint).unlink(missing_ok=True)

    def _register(self, kubelet: Path) -> None:
        with grpc.insecure_channel(f"unix://{kubelet}") as channel:
            stub = pb_grpc.RegistrationStub(channel)
            for resource in self.resources:
                stub.Register(
                    pb.RegisterRequest(
                        version=API_VERSION,
                        endpoint=resource.endpoint,
                        resource_name=resource.name,
                        options=pb.DevicePluginOptions(
                            pre_start_required=True, get_preferred_allocation_available=True
                        ),
                    ),
                    timeout=10,
                )
        self.registrations += 1
        log.info("registered %s with the kubelet", ", ".join(r.name for r in self.resources))

    def _ours_intact(self) -> bool:
        return all(_inode(self.folder / r.endpoint) is not None for r in self.resources)

    def run(self) -> None:
        """Until stop(): serve, register, and start over whenever the kubelet restarts."""
        kubelet = self.folder / KUBELET_SOCKET
        backoff = 0.5
        try:
            while not self._stop.is_set():
                self._probe()
                seen = _inode(kubelet)
                if seen is None:
                    self._stop.wait(self.config.health_interval)
                    continue
                self._serve()
                try:
                    self._register(kubelet)
                except grpc.RpcError as exc:
                    log.warning("registration failed (%s); retrying in %.1fs", exc.code().name, backoff)
                    self._shutdown()
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                backoff = 0.5
                while not self._stop.wait(self.config.health_interval):
                    self._probe()
                    if _inode(kubelet) != seen or not self._ours_intact():
                        log.info("the kubelet restarted or removed our sockets; registering again")
                        break
                self._shutdown()
        finally:
            self.health.close()
            self._shutdown()


def main_loop(config: Config) -> None:
    """Run the plugin until SIGTERM or SIGINT (the container's stop)."""
    import signal

    Path(config.plugin_dir).mkdir(parents=True, exist_ok=True)
    plugin = DevicePlugin(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: plugin.stop())
    log.info("device plugin for %s in %s", ", ".join(r.name for r in plugin.resources), config.plugin_dir)
    plugin.run()


def tpm_present() -> bool:
    """Whether this node's platform key can be TPM-rooted (a TPM resource manager device exists)."""
    return os.path.exists("/dev/tpmrm0") or os.path.exists("/dev/tpm0")
