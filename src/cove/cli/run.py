"""cove run."""

from __future__ import annotations

from pathlib import Path

import click

from cove.cli import direct
from cove.cli.options import ParentExists
from cove.errors import CoveError
from cove.image import instance as instance_mod


def _signer(value: str | None) -> bytes | None:
    if value is None:
        return None
    try:
        signer = bytes.fromhex(value)
    except ValueError:
        signer = b""
    if len(signer) != 32:
        raise CoveError(f"--signer {value}: expected 64 hex digits")
    return signer


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--backend", help="Backend to use (default: [enclave] backend, usually auto).")
@click.option(
    "--debug-enclave",
    "debug_shell",
    is_flag=True,
    help="Run any program (e.g. /bin/sh), not only entry points, in a debug enclave; refused otherwise.",
)
@click.option("--debug", "old_debug", is_flag=True, hidden=True)
@click.option(
    "--package",
    "package",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Run from a package made by `cove package` instead of an instance.",
)
@click.option("--signer", help="Refuse unless the manifest is signed by this signer (hex).")
@click.option(
    "--state",
    "state_dir",
    type=ParentExists(),
    help="Persistent state folder (default: the instance's run/, or ~/.local/state/cove/NAME).",
)
@click.option("-d", "--detach", is_flag=True, help="Start through `cove daemon` and print the enclave's id.")
@click.option("--name", help="With -d: the enclave's name (unique on the node).")
@click.option(
    "--restart", default="no", show_default=True, help="With -d: no, on-failure[:N] or always (doubling back-off)."
)
@click.argument("program")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def run(
    ctx,
    backend: str | None,
    debug_shell: bool,
    old_debug: bool,
    package: Path | None,
    signer: str | None,
    state_dir: Path | None,
    detach: bool,
    name: str | None,
    restart: str,
    program: str,
    args: tuple[str, ...],
) -> int:
    """Verify the build and run PROGRAM inside the enclave; exits with its exit code (docs/cli.md).

    With `cove daemon` running (and COVE_NO_DAEMON unset) an instance runs through it (docs/node.md).
    """
    if detach or name or restart != "no":
        if not detach or package is not None or debug_shell or state_dir is not None:
            raise CoveError(
                "--name and --restart go with -d, and -d runs an instance through the daemon "
                "(not with --package, --debug-enclave or --state)"
            )
        from cove.cli import lifecycle

        _signer(signer)
        target = instance_mod.open_instance(ctx.directory)
        return lifecycle.start_detached(target.root, program, args, name, backend, restart, signer)
    if package is None and not debug_shell and state_dir is None and backend in (None, "auto", "sim"):
        from cove.cli import lifecycle

        if lifecycle.daemon_available():
            _signer(signer)
            target = instance_mod.open_instance(ctx.directory)
            if runs_on_node(target, backend):
                code = lifecycle.run_attached(target.root, program, args, backend, signer)
                if code is not None:
                    return code  # else the daemon refused its host paths: run directly, as this user
    if old_debug:  # `cove --debug` shows tracebacks; this one was renamed so the two are not confused
        click.echo("cove: note: `cove run --debug` is now `cove run --debug-enclave`", err=True)
        debug_shell = True
    return direct.run(ctx.directory, program, tuple(args), backend, debug_shell, package, _signer(signer), state_dir)


def runs_on_node(target, backend: str | None = None) -> bool:
    """Whether the daemon's store runs this instance (sim, or vm as its cove.toml says when no --backend
    overrides it; not an encrypted image); else direct mode."""
    from cove.image import encryption

    try:
        configured = target.config().enclave.backend
    except CoveError:
        return True  # the daemon reports a broken cove.toml as direct mode would
    node_runs = configured in ("auto", "sim") or (configured == "vm" and backend is None)
    return node_runs and encryption.find(target.build_dir) is None


runtime_dir_full = direct.runtime_dir_full


COMMANDS = (run,)
