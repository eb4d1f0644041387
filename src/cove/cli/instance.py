"""cove new, add, keygen, build."""

from __future__ import annotations

from pathlib import Path

import click

from cove.image import instance as instance_mod


@click.command()
@click.argument("name")
def new(name: str) -> None:
    """Create the instance folder NAME (cove.toml, image/, build/, run/)."""
    created = instance_mod.create(Path(name), Path(name).name)
    click.echo(f"created instance {created.root} (edit cove.toml, then `cove add` and `cove build`)")


@click.command()
@click.option("--to", "to", metavar="DIR", help="Place the paths under DIR inside the image.")
@click.option("--bom", "bom_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Copy what a checked-in bom file lists.")
@click.option("--no-deps", is_flag=True, help="Do not copy the interpreter and shared libraries of ELF files.")
@click.argument("paths", nargs=-1)
@click.pass_obj
def add(ctx, to: str | None, bom_file: Path | None, no_deps: bool, paths: tuple[str, ...]) -> None:
    """Copy programs (with the libraries they load) and folders into image/."""
    from cove.image import bom
    target = instance_mod.open_instance(ctx.directory)
    if not paths and bom_file is None:
        raise click.UsageError("give PATH... or --bom FILE")
    plans = []
    if bom_file is not None:
        plans.append(bom.plan_bom(bom_file, not no_deps))
    if paths:
        plans.append(bom.plan(list(paths), to, not no_deps))
    for the_plan in plans:
        result = bom.apply(target.image, the_plan)
        for note in the_plan.notes:
            click.echo(f"note: {note}", err=True)
        click.echo(f"added {result.files} files ({result.bytes} bytes), {result.unchanged} unchanged")


@click.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the key (default: ~/.config/cove/signing-key.pem).")
@click.option("--force", is_flag=True, help="Replace an existing key.")
def keygen(out: Path | None, force: bool) -> None:
    """Create a developer signing key (Ed25519)."""
    from cove.image import signing
    path = out or signing.default_key_path()
    key = signing.generate_key(path, overwrite=force)
    signer = signing.signer_of(signing.raw_public(key.public_key()))
    click.echo(f"wrote {path}\nsigner {signer.hex()}")


@click.command()
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Signing key (default: ~/.config/cove/signing-key.pem, created on first use).")
@click.pass_obj
def build(ctx, key_path: Path | None) -> None:
    """Measure the image and configuration and sign the manifest."""
    from cove.image import build as build_mod, signing
    target = instance_mod.open_instance(ctx.directory)
    target.config()  # a bad cove.toml is reported before anything is created
    if key_path is None and not signing.default_key_path().exists():
        signing.generate_key(signing.default_key_path())
        click.echo(f"created signing key {signing.default_key_path()}", err=True)
    result = build_mod.build(target, key_path)
    click.echo(f"measurement {result.manifest.measurement.hex()}")
    click.echo(f"signer      {result.signature.signer.hex()}")
    click.echo(f"image       {result.manifest.image_files} files, {result.manifest.image_bytes} bytes "
               f"({result.rehashed} hashed, {result.cached} unchanged)")


COMMANDS = (new, add, keygen, build)
