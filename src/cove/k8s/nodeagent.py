"""The node agent: labels that let pods select nodes that can run their enclaves.

``cove.dev/backend`` (sim, vm, sgx, tdx, snp), ``cove.dev/platform`` (tpm or
self-certified), ``cove.dev/version`` and ``cove.dev/ready`` (the node service
answers). The node service's version answer is the source where it says; what
it does not say is detected on the host. Published either as a Node Feature
Discovery feature file (NFD turns it into labels; no Node write access needed)
or by patching the Node object directly (the agent then needs ``patch`` on
nodes, and only its own, by the chart's RBAC and the NODE_NAME downward API).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from collections.abc import Callable

from cove import __version__, util
from cove.k8s import DOMAIN
from cove.k8s.health import DaemonProbe, Health

BACKENDS = ("sim", "vm", "sgx", "tdx", "snp")
PLATFORMS = ("tpm", "self-certified")
FEATURE_FILE = "cove"
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

log = logging.getLogger("cove.k8s.nodeagent")


def detect_backend(dev: Path = Path("/dev")) -> str:
    """The strongest backend this host offers, from its devices."""
    if (dev / "sgx_enclave").exists():
        return "sgx"
    if (dev / "kvm").exists():
        return "vm"
    return "sim"


def detect_platform(dev: Path = Path("/dev")) -> str:
    return "tpm" if (dev / "tpmrm0").exists() or (dev / "tpm0").exists() else "self-certified"


def labels(
    health: Health, backend: str | None = None, platform: str | None = None, dev: Path = Path("/dev")
) -> dict[str, str]:
    """The labels for this node: the node service's word first, then flags, then detection."""
    info = health.info if health.up else {}
    chosen_backend = str(info.get("backend") or backend or detect_backend(dev))
    chosen_platform = str(info.get("platform") or platform or detect_platform(dev))
    version = str(info.get("version") or __version__)
    if chosen_backend not in BACKENDS:
        raise ValueError(f"backend {chosen_backend!r} is not one of {', '.join(BACKENDS)}")
    if chosen_platform not in PLATFORMS:
        raise ValueError(f"platform {chosen_platform!r} is not one of {', '.join(PLATFORMS)}")
    if not _LABEL_VALUE.match(version) or len(version) > 63:
        version = "unknown"
    return {
        f"{DOMAIN}/backend": chosen_backend,
        f"{DOMAIN}/platform": chosen_platform,
        f"{DOMAIN}/version": version,
        f"{DOMAIN}/ready": "true" if health.up else "false",
    }


def write_feature_file(folder: Path, values: dict[str, str]) -> bool:
    """Write NFD's local feature file atomically; False if it already says this."""
    target = folder / FEATURE_FILE
    text = "# Written by `cove k8s node-agent`; Node Feature Discovery publishes these as labels.\n" + "".join(
        f"{key}={value}\n" for key, value in sorted(values.items())
    )
    try:
        if target.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{FEATURE_FILE}.tmp"
    temp.write_text(text)
    os.replace(temp, target)
    return True


def patch_node(node: str, values: dict[str, str]) -> None:
    from cove.k8s.kubeapi import Api

    Api().merge_patch(f"/api/v1/nodes/{node}", {"metadata": {"labels": values}})


class Agent:
    """Publishes the labels now and whenever they change."""

    def __init__(
        self,
        publish: Callable[[dict[str, str]], None],
        probe: Callable[[], Health] | None = None,
        backend: str | None = None,
        platform: str | None = None,
        interval: float = 30.0,
    ):
        self.publish = publish
        self.probe = probe or DaemonProbe()
        self.backend, self.platform, self.interval = backend, platform, interval
        self._stop = util.Wakeup()  # stop() is called from a signal handler (cove.util.Wakeup says why)
        self._last: dict[str, str] | None = None

    def stop(self) -> None:
        """End run() (its wait at once); safe in a signal handler and from another thread."""
        self._stop.set()

    def once(self) -> dict[str, str]:
        values = labels(self.probe(), self.backend, self.platform)
        if values != self._last:
            self.publish(values)
            log.info("labels %s", " ".join(f"{k}={v}" for k, v in sorted(values.items())))
            self._last = values
        return values

    def run(self) -> None:
        while True:
            try:
                self.once()
            except Exception as exc:  # the API server or the folder may come back; say so and try again
                log.warning("publishing labels failed: %s", exc)
                self._last = None
            if self._stop.wait(self.interval):
                return
