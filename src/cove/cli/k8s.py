"""cove k8s: the long-running Kubernetes components (docs/kubernetes.md)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from cove.errors import CoveError, UnreachableError


def _logging(level: str) -> None:
    """Structured key=value lines on stderr, one per event, as the other services log."""
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)r",
    )


LOG_LEVEL = click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="How much to log.",
)


@click.group()
def k8s() -> None:
    """Kubernetes components: device plugin, node agent, admission webhook, operator."""


@k8s.command("device-plugin")
@click.option(
    "--slots",
    type=click.IntRange(1, 4096),
    default=8,
    show_default=True,
    help="Enclave slots this node advertises as cove.dev/enclave.",
)
@click.option(
    "--memory-mib",
    type=click.IntRange(0, 1 << 20),
    default=0,
    show_default=True,
    help="MiB advertised as cove.dev/enclave-memory (0: not advertised).",
)
@click.option(
    "--tpm",
    type=click.Choice(["auto", "yes", "no"]),
    default="auto",
    show_default=True,
    help="Advertise cove.dev/tpm: auto when a TPM device is present.",
)
@click.option(
    "--plugin-dir",
    default="/var/lib/kubelet/device-plugins",
    show_default=True,
    help="The kubelet's device-plugin folder (its kubelet.sock lives there).",
)
@click.option(
    "--run-dir",
    default="/run/cove",
    show_default=True,
    help="The node service's runtime folder (its socket, for the plugin's health probe; never handed to pods).",
)
@click.option("--daemon-socket", help="The node service's socket (default RUN_DIR/cove.sock).")
@click.option(
    "--health-interval",
    type=click.FloatRange(0.05, 300),
    default=5.0,
    show_default=True,
    help="Seconds between health probes of the node service.",
)
@LOG_LEVEL
def device_plugin(slots, memory_mib, tpm, plugin_dir, run_dir, daemon_socket, health_interval, log_level) -> None:
    """Advertise enclave slots, enclave memory and TPM-rooted reports to the kubelet."""
    from cove.k8s import deviceplugin

    _logging(log_level)
    use_tpm = deviceplugin.tpm_present() if tpm == "auto" else tpm == "yes"
    config = deviceplugin.Config(
        slots=slots,
        memory_mib=memory_mib,
        tpm=use_tpm,
        plugin_dir=plugin_dir,
        run_dir=run_dir,
        daemon_socket=daemon_socket,
        health_interval=health_interval,
    )
    try:
        deviceplugin.main_loop(config)
    except PermissionError as exc:
        raise CoveError(
            f"cannot use {exc.filename or plugin_dir}: permission denied",
            "the device plugin runs as root with the kubelet's device-plugin folder mounted",
        ) from None


COMMANDS = [k8s]


@k8s.command()
@click.option("--listen", default="0.0.0.0:8443", show_default=True, help="HOST:PORT to serve HTTPS on.")
@click.option("--cert", "certfile", required=True, help="TLS certificate chain (PEM), e.g. from cert-manager.")
@click.option("--key", "keyfile", required=True, help="TLS private key (PEM).")
@click.option(
    "--kbs-config",
    type=click.Path(path_type=Path),
    help="JSON key-broker settings to inject (url, ca, policy, timeout, retries, resource_prefix); "
    "a mounted ConfigMap, re-read when it changes.",
)
@click.option(
    "--default-memory-mib",
    type=click.IntRange(1, 1 << 20),
    default=256,
    show_default=True,
    help="cove.dev/enclave-memory for a container without a memory limit.",
)
@LOG_LEVEL
def webhook(listen, certfile, keyfile, kbs_config, default_memory_mib, log_level) -> None:
    """The mutating and validating admission webhook for enclave pods."""
    from cove.k8s import webhook as hook

    _logging(log_level)
    if ":" not in listen or not listen.rpartition(":")[2].isdigit():
        raise CoveError(f"--listen {listen!r} is not HOST:PORT")
    unreadable = hook.check_files(certfile, keyfile)
    if unreadable:
        raise CoveError(f"cannot read {unreadable}", "mount the webhook's TLS Secret there")
    settings = hook.SettingsFile(kbs_config, default_memory_mib)
    try:
        settings.get()
    except OSError as exc:
        raise CoveError(f"cannot read --kbs-config {kbs_config}: {exc.strerror}") from None
    except ValueError as exc:
        raise CoveError(f"--kbs-config {kbs_config}: {exc}") from None
    hook.serve(listen, certfile, keyfile, settings)


@k8s.command()
@click.option(
    "--namespace", "namespaces", multiple=True, help="Watch only this namespace (repeatable; default: every namespace)."
)
@click.option(
    "--liveness",
    default="http://0.0.0.0:8080/healthz",
    show_default=True,
    help="The liveness endpoint kopf serves for the kubelet's probe.",
)
@LOG_LEVEL
def operator(namespaces, liveness, log_level) -> None:
    """Reconcile KeyBroker, EnclavePolicy and EnclaveSecret objects into the key broker."""
    import asyncio

    import kopf

    import cove.k8s.operator  # noqa: F401  (registers the handlers)
    from cove.k8s.kubeapi import credentials_present

    _logging(log_level)
    if not credentials_present():
        raise UnreachableError(
            "no Kubernetes API credentials",
            "run in a cluster with a service account, or set $COVE_K8S_API to `kubectl proxy`'s URL",
        )
    # Peering is left to the chart's single replica with a Recreate strategy: one operator at a time.
    try:
        asyncio.run(
            kopf.operator(
                standalone=True, clusterwide=not namespaces, namespaces=list(namespaces), liveness_endpoint=liveness
            )
        )
    except kopf.LoginError:
        raise UnreachableError(
            "no Kubernetes API credentials",
            "run in a cluster with a service account, or set $COVE_K8S_API to `kubectl proxy`'s URL",
        ) from None


@k8s.command("node-agent")
@click.option(
    "--nfd-dir",
    type=click.Path(path_type=Path),
    help="Write a Node Feature Discovery feature file here (e.g. /etc/kubernetes/node-feature-discovery/features.d).",
)
@click.option("--node", envvar="NODE_NAME", help="Patch this Node's labels instead (default $NODE_NAME).")
@click.option(
    "--backend",
    type=click.Choice(["sim", "vm", "sgx", "tdx", "snp"]),
    help="The backend, when the node service does not say (default: detected).",
)
@click.option(
    "--platform",
    type=click.Choice(["tpm", "self-certified"]),
    help="The platform key's root, when the node service does not say (default: detected).",
)
@click.option("--daemon-socket", help="The node service's socket (default /run/cove/cove.sock).")
@click.option(
    "--interval", type=click.FloatRange(0.05, 3600), default=30.0, show_default=True, help="Seconds between checks."
)
@click.option("--once", is_flag=True, help="Publish once and exit.")
@LOG_LEVEL
def node_agent(nfd_dir, node, backend, platform, daemon_socket, interval, once, log_level) -> None:
    """Publish cove.dev/backend, platform, version and ready as node labels."""
    import signal

    from cove.k8s import nodeagent
    from cove.k8s.health import DaemonProbe
    from cove.k8s.kubeapi import credentials_present

    _logging(log_level)
    if (nfd_dir is None) == (node is None):
        raise CoveError("give exactly one of --nfd-dir and --node (or $NODE_NAME)")
    if node is not None and not credentials_present():
        raise UnreachableError(
            "no Kubernetes API credentials to patch the Node",
            "run in a cluster with a service account, or use --nfd-dir",
        )

    def publish(values: dict[str, str]) -> None:
        if nfd_dir:
            nodeagent.write_feature_file(nfd_dir, values)
        else:
            assert node is not None  # exactly one of the two, checked above
            nodeagent.patch_node(node, values)

    agent = nodeagent.Agent(publish, DaemonProbe(daemon_socket), backend, platform, interval)
    if once:
        agent.once()
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    agent.run()
