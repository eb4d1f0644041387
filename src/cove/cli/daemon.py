"""cove daemon: the node service, in the foreground (systemd runs it the same way)."""

from __future__ import annotations

from pathlib import Path

import click

from cove.daemon.client import GROUP, socket_path


@click.command()
@click.option(
    "--root",
    "root",
    type=click.Path(file_okay=False, path_type=Path),
    default="/var/lib/cove",
    show_default=True,
    envvar="COVE_DAEMON_ROOT",
    help="Where the image store and the enclaves' state live.",
)
@click.option("--socket", "socket", help="The API's unix socket (default $COVE_DAEMON_SOCKET or /run/cove/cove.sock).")
@click.option("--group", default=GROUP, show_default=True, help="The group allowed to use the socket besides root.")
@click.option(
    "--metrics", metavar="ADDRESS:PORT", help="Serve Prometheus metrics there, e.g. 127.0.0.1:9464 (off by default)."
)
@click.option(
    "--log-max-size",
    default="10MiB",
    show_default=True,
    metavar="SIZE",
    help="Rotate an enclave's log when it reaches this size (e.g. 512KiB, 10MiB; 0: never).",
)
@click.option(
    "--log-max-files",
    type=click.IntRange(1, 100),
    default=3,
    show_default=True,
    help="Files kept per enclave's log, the live one included.",
)
def daemon(
    root: Path, socket: str | None, group: str, metrics: str | None, log_max_size: str, log_max_files: int
) -> int:
    """Run the node service: image store, enclaves that outlive it, /dev/attestation (docs/node.md)."""
    from cove.daemon import logfile, server
    from cove.errors import CoveError

    try:
        max_bytes = logfile.parse_size(log_max_size)
    except ValueError as exc:
        raise CoveError(f"--log-max-size: {exc}", "give bytes or a size such as 10MiB") from None
    if 0 < max_bytes < logfile.MIN_BYTES:
        raise CoveError(f"--log-max-size {log_max_size}: the smallest size is {logfile.MIN_BYTES} bytes")
    return server.serve(root.resolve(), socket or socket_path(), group, metrics, max_bytes, log_max_files)


COMMANDS = (daemon,)
