"""cove k8s: the long-running Kubernetes components (docs/kubernetes.md)."""

from __future__ import annotations

import logging
import sys

import click

from cove.errors import CoveError


def _logging(level: str) -> None:
    """Structured key=value lines on stderr, one per event, as the other services log."""
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper()),
                        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)r")


LOG_LEVEL = click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
                         show_default=True, help="How much to log.")


@click.group()
def k8s() -> None:
    """Kubernetes components: device plugin, node agent, admission webhook, operator."""


@k8s.command("device-plugin")
@click.option("--slots", type=click.IntRange(1, 4096), default=8, show_default=True,
              help="Enclave slots this node advertises as cove.dev/enclave.")
@click.option("--memory-mib", type=click.IntRange(0, 1 << 20), default=0, show_default=True,
              help="MiB advertised as cove.dev/enclave-memory (0: not advertised).")
@click.option("--tpm", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="Advertise cove.dev/tpm: auto when a TPM device is present.")
@click.option("--plugin-dir", default="/var/lib/kubelet/device-plugins", show_default=True,
              help="The kubelet's device-plugin folder (its kubelet.sock lives there).")
@click.option("--run-dir", default="/run/cove", show_default=True,
              help="The node service's runtime folder, mounted into enclave containers.")
@click.option("--daemon-socket", help="The node service's socket (default RUN_DIR/cove.sock).")
@click.option("--health-interval", type=click.FloatRange(0.05, 300), default=5.0, show_default=True,
              help="Seconds between health probes of the node service.")
@LOG_LEVEL
def device_plugin(slots, memory_mib, tpm, plugin_dir, run_dir, daemon_socket, health_interval, log_level) -> None:
    """Advertise enclave slots, enclave memory and TPM-rooted reports to the kubelet."""
    from cove.k8s import deviceplugin

    _logging(log_level)
    use_tpm = deviceplugin.tpm_present() if tpm == "auto" else tpm == "yes"
    config = deviceplugin.Config(slots=slots, memory_mib=memory_mib, tpm=use_tpm, plugin_dir=plugin_dir,
                                 run_dir=run_dir, daemon_socket=daemon_socket, health_interval=health_interval)
    try:
        deviceplugin.main_loop(config)
    except PermissionError as exc:
        raise CoveError(f"cannot use {exc.filename or plugin_dir}: permission denied",
                        "the device plugin runs as root with the kubelet's device-plugin folder mounted") from None


COMMANDS = [k8s]
