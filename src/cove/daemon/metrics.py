"""Prometheus metrics of the node (`cove daemon --metrics ADDRESS:PORT`; off by default).

Counters and the start-latency histogram are kept by the daemon as it
works; the rest is read when scraped: enclaves by state and backend, each
running enclave's memory (its cgroup) and CPU time (its processes), the
store's size, and /dev/attestation reads by outcome from the node's
attestation server.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TICKS = os.sysconf("SC_CLK_TCK")


if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from cove.daemon.server import Daemon


class Metrics:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.registry = CollectorRegistry()
        self.starts = Counter(
            "cove_enclave_starts", "Enclaves started through the daemon", ["backend"], registry=self.registry
        )
        self.failures = Counter(
            "cove_enclave_start_failures",
            "Starts the daemon refused or could not make",
            ["reason"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cove_enclave_start_seconds",
            "From the API request to a running supervisor",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.registry.register(_Scraped(daemon))

    def serve(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry)


def _cgroup_memory(supervisor: int) -> int | None:
    """Bytes charged to the enclave's memory cgroup (cove-SUPERVISORPID-*, v1 or v2)."""
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        base = (
            f"/sys/fs/cgroup/memory{path}"
            if "memory" in controllers.split(",")
            else f"/sys/fs/cgroup{path}"
            if controllers == ""
            else None
        )
        if base is None or not os.path.isdir(base):
            continue
        for name in os.listdir(base):
            if name.startswith(f"cove-{supervisor}-"):
                for leaf in ("memory.usage_in_bytes", "memory.current"):
                    try:
                        return int(open(os.path.join(base, name, leaf)).read())
                    except OSError:
                        continue
    return None


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process and its waited-for children (the sandbox's init covers the enclave)."""
    try:
        data = open(f"/proc/{pid}/stat", "rb").read()
    except OSError:
        return 0.0
    fields = data[data.rindex(b")") + 2 :].split()
    return sum(int(f) for f in fields[11:15]) / TICKS


class _Scraped:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        from cove.daemon.attestation import request
        from cove.runtime.procfs import children, sandbox_init

        by_state = GaugeMetricFamily("cove_enclaves", "Enclaves by state and backend", labels=["state", "backend"])
        memory = GaugeMetricFamily(
            "cove_enclave_memory_bytes", "Memory of a running enclave (its cgroup)", labels=["id", "name"]
        )
        cpu = CounterMetricFamily("cove_enclave_cpu_seconds", "CPU time of a running enclave", labels=["id", "name"])
        counts: dict[tuple[str, str], int] = {}
        for enclave in self.daemon.registry.all():
            key = (enclave.status, enclave.record.get("backend", "sim"))
            counts[key] = counts.get(key, 0) + 1
            pid = enclave.state.get("pid")
            if enclave.ended or not pid or not enclave.supervisor_alive():
                continue
            used = _cgroup_memory(pid)
            if used is not None:
                memory.add_metric([enclave.id[:12], enclave.name], used)
            init = sandbox_init(pid)
            if init:
                cpu.add_metric(
                    [enclave.id[:12], enclave.name], _cpu_seconds(init) + sum(_cpu_seconds(p) for p in children(init))
                )
        for (state, backend), count in sorted(counts.items()):
            by_state.add_metric([state, backend], count)
        yield by_state
        yield memory
        yield cpu
        store = GaugeMetricFamily("cove_store_bytes", "Bytes held by the image store's blobs")
        store.add_metric([], self.daemon.store.size())
        yield store
        reads = CounterMetricFamily(
            "cove_attestation_requests", "Reads of /dev/attestation quote and report", labels=["outcome"]
        )
        try:
            status = request(str(self.daemon.root / "attestation.sock"), {"op": "status"}, timeout=2)
            for outcome, count in sorted(status.get("requests", {}).items()):
                reads.add_metric([outcome], count)
        except (OSError, ValueError):
            pass
        yield reads
