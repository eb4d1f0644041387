"""cove new, add, keygen, build."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from cove.image import instance as instance_mod

PROGRESS_FROM = 64 << 20  # bytes: smaller copies finish before a bar is worth drawing


@click.command()
@click.argument("name")
def new(name: str) -> None:
    """Create the instance folder NAME (cove.toml, image/, build/, run/)."""
    created = instance_mod.create(Path(name), Path(name).name)
    click.echo(f"created instance {created.root} (edit cove.toml, then `cove add` and `cove build`)")


@click.command()
@click.option("--to", "to", metavar="DIR", help="Place the paths under DIR inside the image.")
@click.option(
    "--bom", "bom_file", type=click.Path(dir_okay=False, path_type=Path), help="Copy what a checked-in bom file lists."
)
@click.option("--no-deps", is_flag=True, help="Do not copy the interpreter and shared libraries of ELF files.")
@click.option(
    "--sdk",
    is_flag=True,
    help="Add the Python SDK (from cove import enclave) as "
    "/usr/lib/python3/dist-packages/cove/enclave.py, or DIR/cove/enclave.py with --to.",
)
@click.argument("paths", nargs=-1)
@click.pass_obj
def add(ctx, to: str | None, bom_file: Path | None, no_deps: bool, sdk: bool, paths: tuple[str, ...]) -> None:
    """Copy programs (with the libraries they load) and folders into image/.

    \b
    Where files land in the image:
      a relative file ../hello          -> /bin/hello
      absolute path   /opt/x/venv       -> /opt/x/venv (the same path)
      --to DIR        --to /app a.py    -> /app/a.py
    Keep files out of /tmp, /proc, /dev and other mount targets: the
    enclave's mounts hide them (cove build refuses such an image).
    ELF programs also bring their loader, their shared libraries and what
    glibc loads at run time (libgcc_s, NSS modules); --no-deps skips that.
    """
    from cove.image import bom

    target = instance_mod.open_instance(ctx.directory)
    if not paths and bom_file is None and not sdk:
        raise click.UsageError("give PATH..., --bom FILE or --sdk")
    plans = []
    if sdk:
        plans.append(bom.plan_sdk(to))
    if bom_file is not None:
        plans.append(bom.plan_bom(bom_file, not no_deps))
    if paths:
        plans.append(bom.plan(list(paths), to, not no_deps))
    for the_plan in plans:
        with _progress(bom.plan_bytes(the_plan), "copying") as advance:
            result = bom.apply(target.image, the_plan, advance)
        for note in the_plan.notes:
            click.echo(f"note: {note}", err=True)
        click.echo(f"added {result.files} files ({result.bytes} bytes), {result.unchanged} unchanged")


@contextmanager
def _progress(total: int, what: str) -> Iterator[Callable[[int], object] | None]:
    """A rich progress bar on stderr for copies of 64 MB or more on a terminal; nothing otherwise."""
    if total < PROGRESS_FROM or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(
        TextColumn(what),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        transient=True,
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


@click.command()
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the key (default: ~/.config/cove/signing-key.pem).",
)
@click.option("--force", is_flag=True, help="Replace an existing key.")
@click.option(
    "--verifier",
    is_flag=True,
    help="Create the verifier's token-signing key instead (for `cove verify --token --token-key`; "
    "default ~/.config/cove/verifier-key.pem).",
)
def keygen(out: Path | None, force: bool, verifier: bool) -> None:
    """Create a developer signing key (Ed25519), or with --verifier the key that signs attestation tokens."""
    from cove.image import signing

    if verifier:
        _verifier_key(out, force)
        return
    path = out or signing.default_key_path()
    key = signing.generate_key(path, overwrite=force)
    signer = signing.signer_of(signing.raw_public(key.public_key()))
    click.echo(f"wrote {path}\nsigner {signer.hex()}")


@click.command()
@click.option(
    "--key",
    "key_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Signing key (default: ~/.config/cove/signing-key.pem, created on first use).",
)
@click.option(
    "--encrypt-image",
    "encrypt_source",
    metavar="SOURCE",
    help="Also write the image encrypted, opened at run time with the key SOURCE: "
    "seal:mrsigner, seal:mrenclave, file:PATH, kbs:RESOURCE (or insecure:HEX, debug only).",
)
@click.option(
    "--image-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --encrypt-image kbs:RESOURCE: the key to encrypt with, the one the broker will release.",
)
@click.pass_obj
def build(ctx, key_path: Path | None, encrypt_source: str | None, image_key_file: Path | None) -> None:
    """Measure the image and configuration and sign the manifest."""
    from cove.image import build as build_mod, signing

    target = instance_mod.open_instance(ctx.directory)
    config = target.config()  # a bad cove.toml is reported before anything is created
    encryption = _encryption(encrypt_source, image_key_file, config)
    if key_path is None and not signing.default_key_path().exists():
        signing.generate_key(signing.default_key_path())
        click.echo(f"created signing key {signing.default_key_path()}", err=True)
    result = build_mod.build(target, key_path, encryption)
    click.echo(f"measurement {result.manifest.measurement.hex()}")
    click.echo(f"signer      {result.signature.signer.hex()}")
    click.echo(
        f"image       {result.manifest.image_files} files, {result.manifest.image_bytes} bytes "
        f"({result.rehashed} hashed, {result.cached} unchanged)"
    )
    if result.encrypted_with:
        click.echo(f"encrypted   build/image.enc, opened with {result.encrypted_with}")
    if result.manifest.image_files == 0:
        click.echo(
            "cove: warning: the image holds no files, so `cove run` has nothing to run "
            "(add programs with `cove add`, then build again)",
            err=True,
        )
    for warning in result.warnings:
        click.echo(f"cove: warning: {warning}", err=True)


def _verifier_key(out: Path | None, force: bool) -> None:
    from cove.attest import ear
    from cove.cli.attest import default_token_key
    from cove.errors import CoveError

    path = out or default_token_key()
    if path.exists():
        if not force:
            raise CoveError(f"{path} already exists", "pass --force to replace it, or choose --out")
        path.unlink()
    key = ear.VerifierKey.load_or_create(path)
    click.echo(f"wrote {path}\nkid {key.kid}")


def _encryption(source: str | None, key_file: Path | None, config):
    """--encrypt-image and --image-key-file, checked together (before any key or file is made)."""
    from cove.errors import CoveError
    from cove.fs import keys
    from cove.image import encryption
    from cove.image.build import ImageEncryption

    if source is None:
        if key_file is not None:
            raise CoveError("--image-key-file goes with --encrypt-image kbs:RESOURCE")
        return None
    kind = keys.parse(encryption.check_source(source, config)).kind
    if kind == "kbs":
        if key_file is None:
            raise CoveError(
                "--encrypt-image kbs:RESOURCE needs --image-key-file FILE",
                "the key the broker will release: upload the same file as that resource",
            )
        return ImageEncryption(source, keys.read_key_file(key_file))
    if key_file is not None:
        raise CoveError(f"--image-key-file is only for kbs: sources; {kind}: keys are found by the source")
    return ImageEncryption(source)


COMMANDS = (new, add, keygen, build)
