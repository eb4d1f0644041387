"""cove kbs: init, serve, get, collateral, admin."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cove.cli.options import InputPath
from cove.decode import decode_json
from cove.errors import CoveError

PathType = click.Path(path_type=Path)


def _state(state: Path | None) -> Path:
    from cove.kbs.runner import default_state

    return state or default_state()


@click.group()
def kbs() -> None:
    """The key broker: attestation-gated secrets over the KBS protocol (docs/kbs.md)."""


@kbs.command()
@click.option("--state", type=PathType, help="State folder (default ~/.local/state/cove/kbs or $COVE_KBS_STATE).")
@click.option("--db", help="Database: sqlite:///PATH (default STATE/kbs.db) or postgresql://...")
@click.option("--master-key-file", type=PathType, help="Master key file (default STATE/master.key, created).")
@click.option("--admin-name", default="admin", show_default=True, help="Name of the first admin key.")
@click.option(
    "--tls-name", "tls_names", multiple=True, help="Names for the local TLS certificate (default localhost, 127.0.0.1)."
)
@click.option("--url", help="The broker's URL, recorded in admin.json for `cove kbs admin`.")
@click.option("--sealed", is_flag=True, help="Keep the master key sealed to this platform (STATE/master.sealed).")
def init(state, db, master_key_file, admin_name, tls_names, url, sealed) -> None:
    """Create a broker's master key, database, first admin key and local TLS certificate."""
    from cove.kbs import runner

    folder = _state(state)
    # init only adds what is missing: say which parts were already there, so a re-run is not mistaken for a fresh setup
    before = {
        name for name in ("master.key", "master.sealed", "admin.json", "tls.crt", "kbs.db") if (folder / name).exists()
    }
    if master_key_file is not None and master_key_file.exists():
        before.add("master.key")
    fresh = not folder.exists()
    try:
        result = runner.init(
            folder, db, master_key_file, admin_name, tuple(tls_names) or ("localhost", "127.0.0.1"), url, sealed
        )
    except BaseException:
        if fresh:  # a first init that failed (a full disk, a bad --db) leaves no half-made state behind
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
        raise

    def kept(*names: str) -> str:
        return " [existing, kept]" if before.intersection(names) else ""

    click.echo(f"broker state in {result.state}" + (" (already set up: nothing was replaced)" if before else ""))
    click.echo(f"  database      {result.db}" + (kept("kbs.db") if db is None else ""))
    click.echo(
        f"  master key    {result.master_key_file or '$COVE_KBS_MASTER_KEY'}"
        f"{kept('master.key', 'master.sealed')} (keep it safe: it decrypts every secret)"
    )
    click.echo(f"  admin key     {result.admin_key_file}{kept('admin.json')} (for `cove kbs admin`)")
    if result.tls:
        click.echo(f"  TLS           {result.tls[1]}{kept('tls.crt')} (clients pin {result.tls[0]} with --ca)")
    if url and "admin.json" in before:
        click.echo(
            f"cove: note: --url was not recorded: {result.admin_key_file} already exists "
            '(edit its "url", or pass --url to `cove kbs admin`)',
            err=True,
        )
    click.echo(f"next: cove kbs serve --state {result.state}")


@kbs.command()
@click.option("--state", type=PathType, help="State folder made by `cove kbs init`.")
@click.option("--db", help="sqlite:///PATH or postgresql://USER@HOST:PORT/DB (default STATE/kbs.db).")
@click.option("--listen", default="127.0.0.1:8443", show_default=True, help="HOST:PORT to listen on.")
@click.option("--cert", "certfile", type=PathType, help="TLS certificate chain (default STATE/tls.crt).")
@click.option("--key", "keyfile", type=PathType, help="TLS private key (default STATE/tls.key).")
@click.option("--insecure-http", is_flag=True, help="Serve plain HTTP (tests and local experiments only).")
@click.option("--master-key-file", type=PathType, help="Master key file (default STATE/master.key).")
@click.option("--master-key-sealed", type=PathType, help="Master key sealed to this platform.")
@click.option("--policy", type=InputPath(), help="Attestation policy file (default: docs/kbs.md's default).")
@click.option("--sgx-root-ca", type=InputPath(), help="Intel SGX Root CA (PEM), for sgx and tdx evidence.")
@click.option(
    "--snp-ask-ark",
    type=InputPath(),
    multiple=True,
    help="AMD chain (PEM): ASK or ASVK, and ARK, for snp evidence (VCEK or VLEK).",
)
@click.option(
    "--tpm-ak", type=InputPath(), multiple=True, help="A trusted TPM attestation key (PEM), for tpm evidence."
)
@click.option(
    "--collateral-dir",
    type=PathType,
    help="DCAP collateral for quotes sent without it (default STATE/collateral; `cove kbs collateral import`).",
)
@click.option("--pccs", help="PCCS (or Intel PCS) base URL for collateral the folder lacks.")
@click.option("--issuer", help="iss of attestation tokens (default cove-kbs:<broker id>).")
@click.option(
    "--session-lifetime",
    type=click.IntRange(5, 86400),
    default=300,
    show_default=True,
    help="Seconds an attested cookie session lasts.",
)
@click.option(
    "--token-lifetime",
    type=click.IntRange(5, 86400),
    default=3600,
    show_default=True,
    help="Seconds an attestation token lasts.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Worker processes (they share the database).",
)
@click.option("--access-log", is_flag=True, help="Log every request.")
@click.option(
    "--ra-tls",
    is_flag=True,
    help="Inside a Cove enclave: serve a fresh key with an RA-TLS certificate (evidence from "
    "/dev/attestation); clients verify it with a policy instead of a CA.",
)
@click.option(
    "--attestation-dir",
    type=PathType,
    default=Path("/dev/attestation"),
    show_default=True,
    help="Where /dev/attestation is (--ra-tls).",
)
def serve(
    state,
    db,
    listen,
    certfile,
    keyfile,
    insecure_http,
    master_key_file,
    master_key_sealed,
    policy,
    sgx_root_ca,
    snp_ask_ark,
    tpm_ak,
    collateral_dir,
    pccs,
    issuer,
    session_lifetime,
    token_lifetime,
    workers,
    access_log,
    ra_tls,
    attestation_dir,
) -> None:
    """Serve the KBS protocol and the admin API."""
    from cove.kbs import runner, serve_options

    options = serve_options.resolve(
        _state(state),
        db=db,
        certfile=certfile,
        keyfile=keyfile,
        insecure_http=insecure_http,
        master_key_file=master_key_file,
        master_key_sealed=master_key_sealed,
        policy=policy,
        sgx_root_ca=sgx_root_ca,
        snp_ask_ark=snp_ask_ark,
        tpm_ak=tpm_ak,
        collateral_dir=collateral_dir,
        pccs=pccs,
        issuer=issuer,
        session_lifetime=session_lifetime,
        token_lifetime=token_lifetime,
        ra_tls=ra_tls,
    )
    from cove.kbs.problems import Problem

    try:
        if not ra_tls:
            runner.serve(options, listen, workers, access_log)
            return
        from cove.kbs import broker_ratls

        with broker_ratls.certificate_files(attestation_dir) as (cert, key):
            click.echo("serving RA-TLS: a fresh key, bound to this enclave's evidence", err=True)
            runner.serve(dict(options, certfile=str(cert), keyfile=str(key)), listen, workers, access_log)
    except Problem as exc:  # the broker refused its own configuration while starting
        raise CoveError(f"the broker cannot start: {exc.detail}") from None


@kbs.command()
@click.argument("url")
@click.argument("paths", nargs=-1, required=True)
@click.option("--ca", "ca_cert", type=PathType, help="The broker's TLS CA certificate (PEM).")
@click.option(
    "--kbs-policy",
    "broker_policy",
    help="An RA-TLS broker: the policy (file, or inline TOML) its evidence must satisfy; instead of --ca.",
)
@click.option("--tee", default="cove", show_default=True, help="Evidence type: cove (/dev/attestation) or sample.")
@click.option(
    "--attestation-dir",
    type=PathType,
    default=Path("/dev/attestation"),
    show_default=True,
    help="Where /dev/attestation is (cove evidence).",
)
@click.option("--sample-claims", help="JSON claims for --tee sample (protocol tests only).")
@click.option("--out", type=PathType, help="Write the (single) secret here (mode 0600) instead of stdout.")
def get(url, paths, ca_cert, broker_policy, tee, attestation_dir, sample_claims, out) -> None:
    """Attest to the broker at URL and print the resources PATHS (repository/type/tag)."""
    from cove.kbs import client as kbs_client
    from cove.util import write_atomic

    provider: kbs_client.EvidenceProvider
    if tee == "cove":
        provider = kbs_client.DevAttestation(attestation_dir)
    elif tee == "sample":
        claims = (
            decode_json(sample_claims, CoveError, "--sample-claims") if sample_claims else {"svn": 1, "debug": False}
        )
        if not isinstance(claims, dict):
            raise CoveError("--sample-claims must be a JSON object")
        provider = kbs_client.SampleEvidence(claims=claims)
    else:
        raise CoveError(
            f"--tee {tee}: `cove kbs get` makes cove or sample evidence",
            "use cove.kbs.client with your TEE's evidence for other types",
        )
    if out and len(paths) != 1:
        raise CoveError("--out takes exactly one PATH")
    if ca_cert and broker_policy:
        raise CoveError(
            "--ca and --kbs-policy exclude each other",
            "--ca for a broker with a CA-issued certificate, --kbs-policy for an RA-TLS broker",
        )
    values = kbs_client.fetch(url, list(paths), provider, ca_cert, broker_policy=broker_policy)
    if out:
        write_atomic(out, values[paths[0]], mode=0o600)
        click.echo(f"wrote {paths[0]} to {out}", err=True)
        return
    for path in paths:
        sys.stdout.buffer.write(values[path])
        if len(paths) > 1:
            sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()


# -- admin ------------------------------------------------------------------------------------------------
class AdminContext:
    def __init__(self, url, key, ca, broker_policy=None):
        self.url, self.key, self.ca, self.broker_policy = url, key, ca, broker_policy
        self._client = None

    @property
    def client(self):
        from cove.kbs.admin_config import connect

        if self._client is None:
            self._client = connect(_state(None), self.url, self.key, self.ca, self.broker_policy)
        return self._client


@kbs.group()
def collateral() -> None:
    """DCAP collateral for SGX and TDX quotes that arrive without it (the Confidential Containers attesters)."""


@collateral.command("import")
@click.argument("files", type=PathType, nargs=-1, required=True)
@click.option("--tee", type=click.Choice(["sgx", "tdx"]), required=True, help="The quotes it is for.")
@click.option("--state", type=PathType, help="State folder of the broker (its collateral goes to STATE/collateral).")
@click.option("--dir", "folder", type=PathType, help="The collateral folder `cove kbs serve --collateral-dir` reads.")
def collateral_import(files, tee, state, folder) -> None:
    """Check collateral JSON files (docs/formats/kbs-evidence.md) and store each for its FMSPC."""
    from cove.kbs.coco_collateral import CollateralSource

    source = CollateralSource(folder or _state(state) / "collateral")
    for path in files:
        click.echo(f"{path}: {tee} collateral stored as {source.import_file(tee, path)}")


@kbs.group()
@click.option("--url", envvar="COVE_KBS_URL", help="The broker's URL ($COVE_KBS_URL).")
@click.option(
    "--key",
    type=PathType,
    envvar="COVE_KBS_ADMIN_KEY",
    help="Admin key file (default STATE/admin.json; $COVE_KBS_ADMIN_KEY).",
)
@click.option("--ca", type=PathType, envvar="COVE_KBS_CA", help="The broker's TLS CA certificate.")
@click.option(
    "--kbs-policy",
    "broker_policy",
    envvar="COVE_KBS_POLICY",
    help="An RA-TLS broker: the policy its evidence must satisfy, instead of --ca ($COVE_KBS_POLICY).",
)
@click.pass_context
def admin(ctx, url, key, ca, broker_policy) -> None:
    """Manage secrets, policies and admin keys; read the audit log."""
    ctx.obj = AdminContext(url, key, ca, broker_policy)


def _print(value) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


@admin.group()
def secret() -> None:
    """Create, list, show, rotate, export and delete secrets."""


@secret.command("create")
@click.argument("path")
@click.option("--generate", "kind", help="Generate: aes-256, ec-p256, ec-p384, rsa-2048/3072/4096, cert, password.")
@click.option("--kind", "upload_kind", default="data", show_default=True, help="Kind of an uploaded value.")
@click.option("--from-file", type=click.File("rb"), help="Upload this file's bytes ('-' for stdin).")
@click.option("--value", help="Upload this text.")
@click.option("--policy", required=True, help="Name of the release policy.")
@click.option("--never-export", is_flag=True, help="Admins can never read the value; only attested enclaves.")
@click.option("--param", "params", multiple=True, help="NAME=VALUE for the kind (length=, key=, days=).")
@click.pass_obj
def secret_create(ctx, path, kind, upload_kind, from_file, value, policy, never_export, params) -> None:
    """Create the secret PATH (repository/type/tag): upload a value or --generate one."""
    parsed = {}
    for item in params:
        name, sep, text = item.partition("=")
        if not sep:
            raise CoveError(f"--param {item}: expected NAME=VALUE")
        parsed[name] = int(text) if text.isdigit() else text
    if kind and (from_file or value is not None):
        raise CoveError("give either --generate KIND or a value (--from-file/--value), not both")
    data = from_file.read() if from_file else value.encode() if value is not None else None
    if kind is None and data is None:
        raise CoveError("give --generate KIND, --from-file FILE or --value TEXT")
    _print(ctx.client.create_secret(path, kind or upload_kind, policy, not never_export, parsed, data))


@secret.command("list")
@click.pass_obj
def secret_list(ctx) -> None:
    """List secrets (path, kind, policy, version, exportable)."""
    for row in ctx.client.secrets():
        flag = "" if row["exportable"] else "  never-export"
        click.echo(f"{row['path']}  {row['kind']}  v{row['version']}  policy={row['policy']}{flag}")


@secret.command("show")
@click.argument("path")
@click.pass_obj
def secret_show(ctx, path) -> None:
    """Show a secret's metadata and versions (never its value)."""
    _print(ctx.client.secret(path))


@secret.command("rotate")
@click.argument("path")
@click.option("--from-file", type=click.File("rb"), help="The new value (uploaded kinds).")
@click.pass_obj
def secret_rotate(ctx, path, from_file) -> None:
    """Add a new version (generated again, or uploaded); enclaves receive it from now on."""
    _print(ctx.client.rotate_secret(path, from_file.read() if from_file else None))


@secret.command("set-policy")
@click.argument("path")
@click.argument("policy")
@click.pass_obj
def secret_set_policy(ctx, path, policy) -> None:
    """Change the release policy of a secret."""
    _print(ctx.client.set_secret_policy(path, policy))


@secret.command("export")
@click.argument("path")
@click.option("--version", type=int, help="A version other than the current one.")
@click.pass_obj
def secret_export(ctx, path, version) -> None:
    """Print an exportable secret's value (refused for never-export secrets)."""
    sys.stdout.buffer.write(ctx.client.export(path, version))
    sys.stdout.flush()


@secret.command("delete")
@click.argument("path")
@click.pass_obj
def secret_delete(ctx, path) -> None:
    """Delete a secret and all its versions."""
    ctx.client.delete_secret(path)
    click.echo(f"deleted {path}")


@admin.group()
def policy() -> None:
    """Release policies (the attestation policy language)."""


@policy.command("put")
@click.argument("name")
@click.argument("file", type=click.File("r"))
@click.pass_obj
def policy_put(ctx, name, file) -> None:
    """Create or replace the policy NAME from FILE ('-' for stdin)."""
    _print(ctx.client.put_policy(name, file.read()))


@policy.command("show")
@click.argument("name")
@click.pass_obj
def policy_show(ctx, name) -> None:
    """Print a policy."""
    click.echo(ctx.client.policy(name)["body"], nl=False)


@policy.command("list")
@click.pass_obj
def policy_list(ctx) -> None:
    """List policies."""
    for row in ctx.client.policies():
        click.echo(f"{row['name']}  v{row['version']}")


@policy.command("delete")
@click.argument("name")
@click.pass_obj
def policy_delete(ctx, name) -> None:
    """Delete a policy no secret uses."""
    ctx.client.delete_policy(name)
    click.echo(f"deleted policy {name}")


@admin.command()
@click.option("--after", type=int, default=0, help="Entries after this id.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--action", help="Only this action (release, attest, secret.create, ...).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def audit(ctx, after, limit, action, as_json) -> None:
    """Read the audit log: who, what, which measurement, when, outcome."""
    import datetime as dt

    from cove.kbs.broker import WRITE_ACTIONS

    actions = ("attest", "release") + WRITE_ACTIONS
    if action is not None and action not in actions:
        raise CoveError(f"--action {action}: no such action", f"one of {', '.join(actions)}")
    rows = ctx.client.audit(after, limit, action)
    if as_json:
        _print(rows)
        return
    for row in rows:
        when = dt.datetime.fromtimestamp(row["at"], dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        click.echo(
            f"{row['id']}  {when}  {row['actor']}  {row['action']}  {row['resource'] or '-'}  "
            f"{row['outcome']}  {row['measurement'] or '-'}  {row['detail'] or ''}".rstrip()
        )


@admin.group()
def key() -> None:
    """Admin keys and their roles (admin, auditor)."""


@key.command("add")
@click.argument("name")
@click.argument("public_jwk", type=click.File("r"))
@click.option("--role", type=click.Choice(["admin", "auditor"]), default="auditor", show_default=True)
@click.pass_obj
def key_add(ctx, name, public_jwk, role) -> None:
    """Register another admin's PUBLIC_JWK file under NAME."""
    jwk = decode_json(public_jwk.read(), CoveError, f"{public_jwk.name} (a JWK)")
    if not isinstance(jwk, dict):
        raise CoveError(f"{public_jwk.name} is not a JWK (a JSON object)")
    _print(ctx.client.add_key(name, jwk, role))


@key.command("new")
@click.argument("name")
@click.argument("out", type=PathType)
def key_new(name, out) -> None:
    """Make a key pair for a new admin: OUT (private, 0600) and OUT.pub.json (to register)."""
    from cove.kbs.admin_config import new_key_file

    public = new_key_file(name, out)
    click.echo(
        f"wrote {out} and {public}; an admin registers it with `cove kbs admin key add {name} {public}`, "
        f'then set "audience" and "url" in {out}'
    )


@key.command("list")
@click.pass_obj
def key_list(ctx) -> None:
    """List admin keys."""
    for row in ctx.client.keys():
        click.echo(f"{row['name']}  {row['role']}")


@key.command("delete")
@click.argument("name")
@click.pass_obj
def key_delete(ctx, name) -> None:
    """Remove an admin key."""
    ctx.client.delete_key(name)
    click.echo(f"deleted admin key {name}")


COMMANDS = (kbs,)
