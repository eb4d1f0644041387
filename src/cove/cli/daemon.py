"""cove daemon: the node service, in the foreground (systemd runs it the same way)."""

from __future__ import annotations

from pathlib import Path

import click

from cove.daemon.client import GROUP, socket_path


@click.command()
@click.option("--root", "root", type=click.Path(file_okay=False, path_type=Path), default="/var/lib/cove",
              show_default=True, envvar="COVE_DAEMON_ROOT",
              help="Where the image store and the enclaves' state live.")
@click.option("--socket", "socket", help="The API's unix socket (default $COVE_DAEMON_SOCKET or "
                                          "/run/cove/cove.sock).")
@click.option("--group", default=GROUP, show_default=True, help="The group allowed to use the socket besides root.")
@click.option("--metrics", metavar="ADDRESS:PORT",
              help="Serve Prometheus metrics there, e.g. 127.0.0.1:9464 (off by default).")
def daemon(root: Path, socket: str | None, group: str, metrics: str | None) -> int:
    """Run the node service: image store, enclaves that outlive it, /dev/attestation (docs/node.md)."""
    from cove.daemon import server

    return server.serve(root.resolve(), socket or socket_path(), group, metrics)


COMMANDS = (daemon,)
