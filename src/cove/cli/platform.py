"""cove platform: set up the platform attestation key and its TPM endorsement; show and stop it."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cove.cli.options import InputPath
from cove.errors import CoveError


@click.group()
def platform() -> None:
    """The platform monitor: its attestation key, rooted in a TPM or self-certified."""


@platform.command()
@click.option("--swtpm", "use_swtpm", is_flag=True, help="Set up and start a software TPM (development, tests).")
@click.option("--no-tpm", "no_tpm", is_flag=True, help="Self-certified: no TPM vouches for the key.")
@click.option("--tcti", help="TPM connection (default: device:/dev/tpmrm0 when present).")
@click.option(
    "--ak-ca",
    "ak_ca",
    type=InputPath(folder=True),
    help="AK CA folder that certifies the attestation key (default: a local one).",
)
@click.option("--ek-chain", "ek_chain", type=InputPath(), help="PEM of the EK certificate's CA chain (hardware TPMs).")
@click.option(
    "--ek-roots", "ek_roots", type=InputPath(), help="PEM of the EK CA the local AK CA trusts (hardware TPMs)."
)
@click.option(
    "--pcr",
    type=click.IntRange(16, 23),
    default=23,
    show_default=True,
    help="The resettable PCR Cove extends with the runtime and the platform key.",
)
@click.option("--rotate", is_flag=True, help="Make a new platform key (a new epoch).")
@click.option("--force", is_flag=True, help="Make a new platform key and a new attestation key.")
@click.option("--json", "as_json", is_flag=True, help="Print the resulting status as JSON.")
def init(
    use_swtpm: bool,
    no_tpm: bool,
    tcti: str | None,
    ak_ca: Path | None,
    ek_chain: Path | None,
    ek_roots: Path | None,
    pcr: int,
    rotate: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Make (or refresh) the platform key and its endorsement; with a TPM, take this epoch's quote."""
    from cove.platform import monitor

    if use_swtpm and no_tpm:
        raise CoveError("--swtpm and --no-tpm exclude each other")
    if no_tpm and (ak_ca or ek_chain or ek_roots):
        raise CoveError("--ak-ca, --ek-chain and --ek-roots certify a TPM's keys: they do not go with --no-tpm")
    mode = "swtpm" if use_swtpm else "none" if no_tpm else "device" if tcti else "auto"
    say = (lambda _: None) if as_json else (lambda line: click.echo(line))
    state = monitor.init(
        monitor.InitOptions(
            tpm=mode, tcti=tcti, ak_ca=ak_ca, ek_chain=ek_chain, ek_roots=ek_roots, pcr=pcr, rotate=rotate, force=force
        ),
        say=say,
    )
    _show(state, as_json)


@platform.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(as_json: bool) -> None:
    """Show the platform key, its root, the current epoch and the TPM's state."""
    from cove.platform import monitor

    _show(monitor.status(), as_json)


@platform.command()
def stop() -> None:
    """Stop the swtpm that `cove platform init --swtpm` started."""
    from cove.platform import monitor

    click.echo("swtpm stopped" if monitor.stop() else "no swtpm was running")


@platform.command("ak-ca")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--ek-roots",
    "ek_roots",
    type=InputPath(),
    required=True,
    help="PEM of the EK CA(s) whose TPMs this CA certifies AKs for.",
)
def ak_ca(directory: Path, ek_roots: Path) -> None:
    """Create an AK certificate authority in DIRECTORY (give its ca.pem to verifiers as ak_ca)."""
    from cove.attest.ak_ca import AkCa

    if (directory / "ca.key").exists():
        raise CoveError(f"{directory} already holds an AK CA")
    try:
        roots = ek_roots.read_bytes()
    except OSError as exc:
        raise CoveError(f"--ek-roots {ek_roots}: cannot read: {exc.strerror}") from None
    ca = AkCa.create(directory, roots)
    click.echo(f"AK CA created: {directory / 'ca.pem'} ({ca.cert.subject.rfc4514_string()})")


def _show(state: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(state, indent=2))
        return
    if not state.get("initialized"):
        click.echo(f"platform not initialized ({state['directory']}): run `cove platform init`")
        return
    root = "TPM-rooted" if state["root"] == "tpm" else "self-certified (no TPM vouches for it)"
    click.echo(f"platform     {state['directory']}")
    click.echo(f"root         {root}")
    for key in ("platform_key", "runtime", "epoch", "epoch_start"):
        if key in state:
            click.echo(f"{key:<12} {state[key]}")
    if not state.get("current", True):
        click.echo(
            "stale        the runtime or the TPM changed since this epoch's endorsement; "
            "the next enclave start (or `cove platform init`) renews it"
        )
    tpm = state.get("tpm")
    if tpm:
        for key in (
            "tcti",
            "pcr",
            "reachable",
            "pcr_matches_quote",
            "ak_handle",
            "ek_issuer",
            "ek_certificate_sha256",
            "ak_name",
            "ak_ca_certificate",
            "ek_root",
            "swtpm_pid",
        ):
            if key in tpm and tpm[key] is not None:
                click.echo(f"tpm.{key:<21} {tpm[key]}")


COMMANDS = (platform,)
