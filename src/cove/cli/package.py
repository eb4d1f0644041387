"""cove package, cove inspect."""

from __future__ import annotations

import errno
import os
import json
from pathlib import Path

import click

from cove.image import instance as instance_mod


@click.command("package")
@click.argument("out", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--debug-enclave", "allow_debug", is_flag=True, help="Allow packaging a debug enclave.")
@click.option("--debug", "old_debug", is_flag=True, hidden=True)
@click.option("--oci", is_flag=True, help="Write an OCI image: a layout folder, or a tarball if PATH ends in .tar.")
@click.option("--tag", help="The OCI image's NAME:TAG (default: NAME:latest).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write (the same as OUT).")
@click.pass_obj
def package_cmd(
    ctx, out: Path | None, allow_debug: bool, old_debug: bool, oci: bool, tag: str | None, output: Path | None
) -> None:
    """Write a deployable archive (default: NAME.tar.gz) for `cove run --package`, or an OCI image (--oci)."""
    from cove.image import package as package_mod

    if old_debug:  # renamed as on `cove run`: `cove --debug` means tracebacks
        click.echo("cove: note: `cove package --debug` is now `cove package --debug-enclave`", err=True)
        allow_debug = True
    if out is not None and output is not None:
        raise click.UsageError("give the output once: OUT or -o PATH")
    out = out or output
    if tag is not None and not oci:
        raise click.UsageError("--tag is for OCI images: add --oci")
    target = instance_mod.open_instance(ctx.directory)
    if oci:  # docs/containers.md
        from cove.oci import image as oci_image

        out = out or Path(f"{target.config().enclave.name}.oci.tar")
        written = oci_image.create(target, out, tag, allow_debug)
        click.echo(
            f"wrote {out} ({written.tag}, digest {written.digest}, "
            f"measurement {written.annotations['cove.dev/measurement']})"
        )
        return
    out = out or Path(f"{target.config().enclave.name}.tar.gz")
    verified = package_mod.create(target, out, allow_debug)
    click.echo(f"wrote {out} (measurement {verified.measurement.hex()})")


def describe(verified, build_dir: Path) -> dict:
    """The identity of a build, as `cove inspect --json` prints it."""
    from cove.image import encryption

    enclave = verified.config.enclave
    encrypted = encryption.find(build_dir)
    root = {"target": "/", "type": "image", "writable": False}
    if encrypted is not None:
        root = dict(root, type="encrypted-image", key=encrypted.key)
    return {
        "name": enclave.name,
        "measurement": verified.measurement.hex(),
        "signer": verified.signer.hex(),
        "product_id": enclave.product_id,
        "svn": enclave.svn,
        "debug": enclave.debug,
        "backend": enclave.backend,
        "runs_on": _runs_on(enclave.backend),
        "network": verified.config.network.mode,
        "image_root": verified.manifest.image_root.hex(),
        "image_files": verified.manifest.image_files,
        "image_bytes": verified.manifest.image_bytes,
        "mounts": [root]
        + [
            {"target": m.target, "type": m.type, "source": m.source, "writable": m.writable}
            for m in verified.config.mounts
        ],
    }


def _runs_on(configured: str) -> str:
    """The backend `cove run` would launch on this host (auto resolved), or why none can."""
    from cove.errors import CoveError
    from cove.runtime import backend

    try:
        return backend.choose(configured).name
    except CoveError as exc:
        return f"none here: {exc.message}"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (lower-case keys, hex hashes).")
@click.argument("target", required=False, type=click.Path(path_type=Path))
@click.pass_obj
def inspect(ctx, as_json: bool, target: Path | None) -> None:
    """Show measurement, signer, product id, svn, debug, backend and mounts."""
    from cove.image import artifacts, package as package_mod
    from cove.runtime.launcher import runtime_dir

    if target is not None and not os.path.lexists(target) and "/" not in str(target):
        from cove.cli import lifecycle  # not a path: an enclave of the daemon (docs/node.md)

        return lifecycle.inspect_enclave(str(target))
    target = target or ctx.directory
    if target.is_file():
        try:
            with package_mod.extracted(target, runtime_dir()) as unpacked:
                build_dir = unpacked / "build"
                info = describe(artifacts.load_verified(build_dir, unpacked / "cove.toml"), build_dir)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            from cove.cli.run import runtime_dir_full

            raise runtime_dir_full(runtime_dir(), target, target.parent) from None
    else:
        found = instance_mod.open_instance(target)
        info = describe(artifacts.load_verified(found.build_dir, found.config_path), found.build_dir)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key == "mounts":
            for mount in value:
                rw = "rw" if mount["writable"] else "ro"
                source = f" <- {mount['source']}" if mount.get("source") else ""
                source += f" (key {mount['key']})" if mount.get("key") else ""
                click.echo(f"{'mount':<12}{mount['target']} {mount['type']} {rw}{source}")
        else:
            click.echo(f"{key:<12}{value}")


COMMANDS = (package_cmd, inspect)
