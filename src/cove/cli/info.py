"""cove info: which backends this host can run, and why not the others."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(as_json: bool) -> None:
    """Say which backends this host can run and, for each one it can't, why."""
    from cove.runtime.backend import all_availability

    states = all_availability()
    if as_json:
        click.echo(json.dumps([s.__dict__ for s in states], indent=2))
        return
    for state in states:
        mark = "yes" if state.available else "no "
        click.echo(f"{state.backend:<5} {mark}  {state.isolation:<20} {state.reason}")


COMMANDS = (info,)
