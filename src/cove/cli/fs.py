"""cove fs: offline tools for encrypted files and volumes (encrypt, decrypt, verify, ls, mount, forget).

``--key`` takes the key sources of encrypted mounts: ``seal:mrenclave`` and
``seal:mrsigner`` (derived for the enclave built in the instance folder, so
run them as the platform's root, where the enclave runs), ``file:PATH``,
``insecure:HEX``. A folder with a volume root is treated as a volume,
anything else as a single protected file (Gramine's format; its bound path
with ``--path``).
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import click

from cove.errors import CoveError

KEY_HELP = "Key source: seal:mrenclave, seal:mrsigner (the instance's enclave), file:PATH or insecure:HEX."
ROLLBACK = click.Choice(["auto", "tpm", "file", "none"])


def _identity(ctx, key_text: str):
    """The enclave identity sealing keys need: the verified build of the instance (-C)."""
    from cove.fs import keys

    if keys.parse(key_text).kind != "seal":
        return None
    from cove.fs.access import Identity
    from cove.image import artifacts
    from cove.image import instance as instance_mod

    target = instance_mod.open_instance(ctx.directory)
    verified = artifacts.load_verified(target.build_dir, target.config_path)
    enclave = verified.config.enclave
    return Identity(verified.measurement, verified.signer, enclave.product_id, enclave.svn, enclave.debug)


def _key(ctx, key_text: str) -> bytes:
    from cove.fs import keys

    return keys.resolve(key_text, _identity(ctx, key_text))


def _open(ctx, volume: Path, key_text: str, writable: bool = False, check_anchor: bool = True):
    from cove.fs.volume_tools import open_checked

    return open_checked(volume, key_text, _identity(ctx, key_text), writable=writable, check_anchor=check_anchor)


def _progress(total: int, what: str):
    """A rich progress bar on a terminal for large jobs; a no-op otherwise."""
    if total < 64 << 20 or not sys.stderr.isatty():
        return None, None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    bar = Progress(TextColumn(what), BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=True)
    task = bar.add_task(what, total=total)
    return bar, (lambda n: bar.advance(task, n))


@click.group()
def fs() -> None:
    """Encrypted files and volumes on the host: encrypt, decrypt, verify, ls, mount, forget."""


@fs.command()
@click.option("--key", "key_text", required=True, help=KEY_HELP)
@click.option("--path", "logical", help="Bind a single file to this path (default: the output's name).")
@click.option(
    "--label",
    default="/",
    show_default=True,
    help="A new volume's mount target (an encrypted mount opens only its own volume).",
)
@click.option(
    "--rollback",
    type=ROLLBACK,
    default="auto",
    show_default=True,
    help="A new volume's rollback anchor (auto: the TPM if there is one, else a platform file).",
)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.pass_obj
def encrypt(
    ctx, key_text: str, logical: str | None, label: str, rollback: str, force: bool, source: Path, output: Path
) -> None:
    """Encrypt SOURCE: a file into one protected file, a folder into a new volume."""
    from cove.fs import transfer, volume_tools
    from cove.fs.index import KeyPolicy

    volume_tools.require_input(source)
    identity = _identity(ctx, key_text)
    from cove.fs import keys

    kek = keys.resolve(key_text, identity)
    bar, progress = _progress(volume_tools.host_size(source), "encrypting")
    with bar or _Null():
        if source.is_dir():
            if not label.startswith("/"):
                raise CoveError(f"--label {label}: give the mount target, an absolute path")
            policy = KeyPolicy.of(key_text, identity.svn if identity else 0)
            files, size, kind = transfer.new_volume_from(
                source, output, kek, label=label, policy=policy, anchor=rollback, force=force, progress=progress
            )
            click.echo(f"created volume {output}: {files} files, {size} bytes, label {label}, rollback anchor {kind}")
        else:
            bound = logical or output.name
            transfer.encrypt_file(source, output, kek, bound, force=force, progress=progress)
            click.echo(f"encrypted {source} into {output} (bound to {bound!r})")


@fs.command()
@click.option("--key", "key_text", required=True, help=KEY_HELP)
@click.option("--path", "logical", help="The path a single file must be bound to (default: any).")
@click.option(
    "--no-rollback-check", is_flag=True, help="Open a volume whose rollback anchor is not on this platform (says so)."
)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.pass_obj
def decrypt(
    ctx, key_text: str, logical: str | None, no_rollback_check: bool, force: bool, source: Path, output: Path
) -> None:
    """Decrypt SOURCE (a volume or a protected file) into OUTPUT, checking every byte."""
    from cove.fs import transfer, volume_tools

    volume_tools.require_input(source)
    if transfer.is_volume(source):
        _warn_unchecked(no_rollback_check)
        with _open(ctx, source, key_text, check_anchor=not no_rollback_check) as volume:
            if volume.problems:
                raise _problems(source, volume.problems)
            bar, progress = _progress(volume_tools.content_size(volume), "decrypting")
            with bar or _Null():
                files, size = transfer.export_tree(volume, output, force=force, progress=progress)
        click.echo(f"decrypted {files} files ({size} bytes) into {output}")
    else:
        bar, progress = _progress(volume_tools.host_size(source), "decrypting")
        with bar or _Null():
            bound = transfer.decrypt_file(source, output, _key(ctx, key_text), logical, force=force, progress=progress)
        click.echo(f"decrypted {source} (bound to {bound!r}) into {output}")


@fs.command()
@click.option("--key", "key_text", required=True, help=KEY_HELP)
@click.option("--path", "logical", help="The path a single file must be bound to (default: any).")
@click.option(
    "--no-rollback-check", is_flag=True, help="Check a volume whose rollback anchor is not on this platform (says so)."
)
@click.argument("source", type=click.Path(path_type=Path))
@click.pass_obj
def verify(ctx, key_text: str, logical: str | None, no_rollback_check: bool, source: Path) -> None:
    """Check every byte of a volume or protected file; list what fails."""
    from cove.fs import transfer, volume_tools

    volume_tools.require_input(source)
    if not transfer.is_volume(source):
        bound, size = transfer.verify_file(source, _key(ctx, key_text), logical)
        click.echo(f"ok: {source}: {size} bytes, bound to {bound!r}")
        return
    _warn_unchecked(no_rollback_check)
    with _open(ctx, source, key_text, check_anchor=not no_rollback_check) as volume:
        found = volume_tools.verify(volume)
        for line in found.recovered:
            click.echo(f"recovered: {line} (an interrupted commit was finished or rolled back)")
        if found.problems:
            raise _problems(source, found.problems)
        anchor = "none (not checked)" if no_rollback_check else volume.store.kind
        click.echo(
            f"ok: {source}: {found.files} files, {found.size} bytes, version "
            f"{found.version}, label {found.label}, rollback anchor {anchor}"
        )


@fs.command(name="ls")
@click.option("--key", "key_text", required=True, help=KEY_HELP)
@click.option("--no-rollback-check", is_flag=True, help="List a volume from another platform.")
@click.argument("volume_dir", metavar="VOLUME", type=click.Path(path_type=Path))
@click.argument("inside", metavar="[PATH]", default="/")
@click.pass_obj
def ls(ctx, key_text: str, no_rollback_check: bool, volume_dir: Path, inside: str) -> None:
    """List the files of a volume (mode, size, path)."""
    from cove.fs import volume_tools

    volume_tools.require_input(volume_dir)
    _warn_unchecked(no_rollback_check)
    with _open(ctx, volume_dir, key_text, check_anchor=not no_rollback_check) as volume:
        for entry in volume_tools.listing(volume, inside):
            extra = f" -> {entry.target}" if entry.target is not None else ""
            click.echo(f"{stat.filemode(entry.mode)} {entry.size:>12} {entry.path}{extra}")


@fs.command()
@click.option("--key", "key_text", required=True, help=KEY_HELP)
@click.option("--read-only", is_flag=True, help="Mount read-only.")
@click.argument("volume_dir", metavar="VOLUME", type=click.Path(path_type=Path))
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
@click.pass_obj
def mount(ctx, key_text: str, read_only: bool, volume_dir: Path, mountpoint: Path) -> None:
    """Mount a volume on the host to inspect it (until unmounted, or Ctrl-C)."""
    from cove.fs import fuse, volume_tools

    volume_tools.require_input(volume_dir)
    if not mountpoint.is_dir():
        raise CoveError(f"{mountpoint} is not a folder", "create the mount point first")
    volume = _open(ctx, volume_dir, key_text, writable=not read_only)
    for problem in volume.problems:
        click.echo(f"warning: {problem}", err=True)
    try:
        fuse.serve(
            volume,
            str(mountpoint),
            name=str(volume_dir),
            read_only=read_only,
            on_ready=lambda: click.echo(
                f"mounted {volume_dir} at {mountpoint} (stop with Ctrl-C or fusermount3 -u {mountpoint})", err=True
            ),
        )
    except RuntimeError as exc:
        volume.close()
        raise CoveError(f"cannot mount {mountpoint}: {exc}", "is FUSE available (scripts/setup)?") from None
    volume.close()


@fs.command()
@click.argument("volume_dir", metavar="VOLUME", type=click.Path(path_type=Path))
def forget(volume_dir: Path) -> None:
    """Drop this platform's rollback records of a volume that was deliberately deleted."""
    from cove.fs import volume_tools

    removed = volume_tools.forget(volume_dir)
    click.echo(f"forgot {len(removed)} record(s) of {volume_dir}; an encrypted mount will start it afresh")


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _warn_unchecked(skipped: bool) -> None:
    if skipped:
        click.echo("warning: the rollback check is skipped; an older copy of the volume would not be noticed", err=True)


def _problems(source: Path, problems: list[str]) -> CoveError:
    from cove.fs.errors import FileIntegrityError

    for line in problems:
        click.echo(f"FAILED {line}")
    return FileIntegrityError(
        f"{source}: {len(problems)} problem(s), first: {problems[0]}",
        "the volume was modified outside Cove; see the list above",
    )


COMMANDS = (fs,)
