"""cove run."""

from __future__ import annotations

import errno
from pathlib import Path

import click

from cove.cli.options import ParentExists
from cove.errors import CoveError, FileSystemError
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
@click.option("--debug-enclave", "debug_shell", is_flag=True,
              help="Run any program (e.g. /bin/sh), not only entry points, in a debug enclave; refused otherwise.")
@click.option("--debug", "old_debug", is_flag=True, hidden=True)
@click.option("--package", "package", type=click.Path(dir_okay=False, path_type=Path),
              help="Run from a package made by `cove package` instead of an instance.")
@click.option("--signer", help="Refuse unless the manifest is signed by this signer (hex).")
@click.option("--state", "state_dir", type=ParentExists(),
              help="Persistent state folder (default: the instance's run/, or ~/.local/state/cove/NAME).")
@click.option("-d", "--detach", is_flag=True, help="Start through `cove daemon` and print the enclave's id.")
@click.option("--name", help="With -d: the enclave's name (unique on the node).")
@click.option("--restart", default="no", show_default=True,
              help="With -d: no, on-failure[:N] or always (doubling back-off).")
@click.argument("program")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def run(ctx, backend: str | None, debug_shell: bool, old_debug: bool, package: Path | None, signer: str | None,
        state_dir: Path | None, detach: bool, name: str | None, restart: str, program: str,
        args: tuple[str, ...]) -> int:
    """Verify the build and run PROGRAM inside the enclave; exits with its exit code (docs/cli.md).

    With `cove daemon` running (and COVE_NO_DAEMON unset) an instance runs through it (docs/node.md).
    """
    if detach or name or restart != "no":
        if not detach or package is not None or debug_shell or state_dir is not None:
            raise CoveError("--name and --restart go with -d, and -d runs an instance through the daemon "
                            "(not with --package, --debug-enclave or --state)")
        from cove.cli import lifecycle
        _signer(signer)
        target = instance_mod.open_instance(ctx.directory)
        return lifecycle.start_detached(target.root, program, args, name, backend, restart, signer)
    if package is None and not debug_shell and state_dir is None and backend in (None, "auto", "sim"):
        from cove.cli import lifecycle
        if lifecycle.daemon_available():
            _signer(signer)
            target = instance_mod.open_instance(ctx.directory)
            if _node_runs(target):
                return lifecycle.run_attached(target.root, program, args, backend, signer)
    from cove.runtime import attestation_service
    if _may_attest(backend, package, ctx.directory):
        attestation_service.prestart()  # its interpreter starts while this one imports and verifies
    try:
        return _run_direct(ctx, backend, debug_shell, old_debug, package, signer, state_dir, program, args)
    finally:
        attestation_service.discard()


def _may_attest(backend: str | None, package: Path | None, directory: Path) -> bool:
    """Whether a direct run will likely serve /dev/attestation itself (not a vm: its guest serves it)."""
    if backend == "vm":
        return False
    if package is not None or backend is not None:
        return True
    try:
        return instance_mod.open_instance(directory).config().enclave.backend != "vm"
    except CoveError:
        return False  # the run reports it


def _run_direct(ctx, backend: str | None, debug_shell: bool, old_debug: bool, package: Path | None,
                signer: str | None, state_dir: Path | None, program: str, args: tuple[str, ...]) -> int:
    from cove.runtime import launcher
    if old_debug:  # `cove --debug` shows tracebacks; this one was renamed so the two are not confused
        click.echo("cove: note: `cove run --debug` is now `cove run --debug-enclave`", err=True)
        debug_shell = True
    request = launcher.RunRequest(program, tuple(args), backend, debug_shell, _signer(signer), state_dir)
    try:
        if package is not None:
            return launcher.run_package(package, request)
        target = instance_mod.open_instance(ctx.directory)
        return launcher.run_instance(target.root, request)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise runtime_dir_full(launcher.runtime_dir(), package, ctx.directory) from None


def _node_runs(target) -> bool:
    """Whether the daemon's store runs this instance (sim, not an encrypted image); else direct mode."""
    from cove.image import encryption
    try:
        configured = target.config().enclave.backend
    except CoveError:
        return True  # the daemon reports a broken cove.toml as direct mode would
    return configured in ("auto", "sim") and encryption.find(target.build_dir) is None


def runtime_dir_full(where: Path, package: Path | None, directory: Path) -> FileSystemError:
    """The enclave's root (or an unpacked package) did not fit: say how much it needs and where to put it."""
    import shutil
    import tarfile

    from cove.image import artifacts
    try:
        if package is not None:
            with tarfile.open(package, "r:gz") as archive:
                needed = sum(member.size for member in archive)
        else:
            needed = artifacts.load_manifest(directory / "build")[0].image_bytes
    except (CoveError, OSError, tarfile.TarError, EOFError):
        needed = None
    free = shutil.disk_usage(where).free if where.is_dir() else 0
    size = f"about {_mb(needed)}" if needed else "about the image's size"
    return FileSystemError(f"no space left in the runtime folder {where} ({_mb(free)} free): the enclave's root "
                           f"is copied there, {size} plus its tmpfs contents",
                           "set COVE_RUNTIME_DIR to a folder with more space, e.g. COVE_RUNTIME_DIR=/var/tmp")


def _mb(size: int) -> str:
    return f"{size / (1 << 20):.1f} MB"


COMMANDS = (run,)
