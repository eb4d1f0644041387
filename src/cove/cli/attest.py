"""cove verify (check evidence, appraise it against a policy, optionally issue a token) and cove jwks."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import click

from cove.cli.options import InputPath
from cove.errors import CoveError, RefusedError

TYPES = ("auto", "cove", "tpm", "sgx", "tdx", "snp")
_HEX_TEXT = re.compile(rb"^[0-9a-fA-F\s]+$")


class PolicyRejected(RefusedError):
    """Valid evidence that the policy does not accept."""


def default_token_key() -> Path:
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config_home / "cove" / "verifier-key.pem"


MAX_INPUT = 4 << 20  # evidence and its collateral are KiBs; /dev/zero or a wrong file must not hang the verifier


def _read(path: str, what: str) -> bytes:
    """A whole input file or stdin, read at most MAX_INPUT + 1 bytes; larger is invalid evidence (exit 5)."""
    from cove.attest.errors import VerificationError

    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_INPUT + 1)  # click.get_binary_stream is deprecated (Click 9)
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_INPUT + 1)
    except FileNotFoundError:
        raise CoveError(f"{what} {path}: not found") from None
    except OSError as exc:
        raise CoveError(f"{what} {path}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_INPUT:
        raise VerificationError(
            f"{what} {path}: larger than {MAX_INPUT >> 20} MiB, more than any evidence or collateral is",
            "check the file name",
        )
    return data


def _evidence_bytes(raw: bytes) -> bytes:
    """Evidence as given: binary, hex text, or a PEM RA-TLS certificate (its evidence is used)."""
    stripped = raw.strip()
    if stripped and len(stripped) % 2 == 0 and _HEX_TEXT.match(stripped) and len(stripped) >= 64:
        return bytes.fromhex(stripped.decode())
    return raw


def _hex(value: str | None, option: str, max_len: int = 64) -> bytes | None:
    if value is None:
        return None
    try:
        data = bytes.fromhex(value.strip())
    except ValueError:
        raise CoveError(f"{option} {value[:40]}: not hex") from None
    if not data or len(data) > max_len:
        raise CoveError(f"{option}: give 1 to {max_len} bytes of hex")
    return data


def _time(value: str | None) -> datetime:
    if value is None:
        return datetime.now(timezone.utc)
    try:
        t = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CoveError(f"--time {value}: not an ISO 8601 time", "e.g. 2025-06-19T12:00:00Z") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _print_human(verdict, kind_label: str) -> None:
    from cove.attest.appraisal import summary

    a = verdict.appraisal
    click.echo(f"valid {kind_label}")
    for key, value in summary(a).items():
        if key in ("evidence_type",):
            continue
        if isinstance(value, dict):
            for sub, v in value.items():
                text = json.dumps(v) if isinstance(v, dict) else v
                click.echo(f"  {key}.{sub}: {text}")
        else:
            click.echo(f"  {key}: {value}")
    for warning in verdict.result.warnings:
        click.echo(f"  warning: {warning}")


def _label(appraisal) -> str:
    if appraisal.evidence_type == "cove":
        root = "TPM-rooted" if appraisal.platform_root == "tpm" else "self-certified"
        return f"cove evidence ({root})"
    return f"{appraisal.evidence_type} evidence"


@click.command()
@click.argument("evidence")
@click.option(
    "--type",
    "kind",
    type=click.Choice(TYPES),
    default="auto",
    show_default=True,
    help="Evidence type (auto detects it).",
)
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Appraisal policy (TOML or JSON); default: the built-in deny-by-default policy.",
)
@click.option("--nonce", help="Hex nonce the evidence must bind (report data prefix; TPM: extraData).")
@click.option("--report-data", "report_data", help="Hex of the exact 64 bytes of report data expected.")
@click.option("--time", "at", help="Verify as of this ISO 8601 time (default: now).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--token", is_flag=True, help="Print an EAR attestation token (JWT) signed by the verifier key.")
@click.option(
    "--token-key",
    type=InputPath(),
    help="Verifier signing key, which must exist (default: ~/.config/cove/verifier-key.pem, made on first use).",
)
@click.option("--collateral", type=click.Path(dir_okay=False), help="sgx/tdx: PCS collateral JSON.")
@click.option("--pccs", help="sgx/tdx: fetch collateral from this PCCS/PCS base URL (cached).")
@click.option("--vcek", type=click.Path(dir_okay=False), help="snp: the VCEK or VLEK certificate.")
@click.option(
    "--ask-ark",
    "ask_ark",
    type=click.Path(dir_okay=False),
    help="snp: trusted AMD bundle (PEM: ASK and/or ASVK, and ARK), instead of the built-in roots.",
)
@click.option("--kds", help="snp: fetch the VCEK from this AMD KDS base URL (cached).")
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Collateral cache folder (default: ~/.cache/cove/collateral).",
)
@click.option("--tpm-sig", "tpm_sig", type=click.Path(dir_okay=False), help="tpm: quote signature (tpm2_quote -s).")
@click.option("--tpm-pcrs", "tpm_pcrs", type=click.Path(dir_okay=False), help="tpm: PCR values (tpm2_quote -o).")
@click.option("--ak", type=click.Path(dir_okay=False), help="tpm: the trusted attestation key (PEM, DER or TPM2B).")
@click.option("--event-log", "event_log", type=click.Path(dir_okay=False), help="tpm: a TCG2 event log to replay.")
def verify(
    evidence: str,
    kind: str,
    policy_file: Path | None,
    nonce: str | None,
    report_data: str | None,
    at: str | None,
    as_json: bool,
    token: bool,
    token_key: Path | None,
    collateral: str | None,
    pccs: str | None,
    vcek: str | None,
    ask_ark: str | None,
    kds: str | None,
    cache_dir: Path | None,
    tpm_sig: str | None,
    tpm_pcrs: str | None,
    ak: str | None,
    event_log: str | None,
) -> int:
    """Verify EVIDENCE (a file, or - for stdin); exit 0 only if valid and accepted by the policy."""
    from cove.attest import verifier
    from cove.attest.errors import VerificationError
    from cove.attest.policy import default_policy, load_policy

    policy = load_policy(policy_file) if policy_file else default_policy()
    now = _time(at)
    raw = _evidence_bytes(_read(evidence, "evidence"))
    from cove.attest.ratls import evidence_from_certificate, looks_like_certificate

    cert_binding = None
    if looks_like_certificate(raw):
        raw, cert_binding = evidence_from_certificate(raw)
    inputs = verifier.Inputs(
        collateral=_read(collateral, "collateral") if collateral else None,
        vcek=_read(vcek, "VCEK") if vcek else None,
        ask_ark=_read(ask_ark, "ASK/ARK") if ask_ark else None,
        tpm_signature=_read(tpm_sig, "TPM signature") if tpm_sig else None,
        tpm_pcrs=_read(tpm_pcrs, "TPM PCR file") if tpm_pcrs else None,
        ak=_read(ak, "AK") if ak else None,
        event_log=_read(event_log, "event log") if event_log else None,
    )
    if pccs or kds:
        from cove.attest.collateral_fetch import Fetcher

        inputs = replace(inputs, fetch=Fetcher(pccs=pccs, kds=kds, cache_dir=cache_dir).inputs_for)
    expected_rd = _hex(report_data, "--report-data")
    if cert_binding is not None:
        if expected_rd is not None:
            raise CoveError(
                "--report-data cannot be used with an RA-TLS certificate",
                "its report data is fixed by the certificate's key",
            )
        expected_rd = cert_binding
    try:
        verdict = verifier.appraise(
            raw, policy, kind=kind, nonce=_hex(nonce, "--nonce"), report_data=expected_rd, now=now, inputs=inputs
        )
    except VerificationError as exc:
        if as_json:
            click.echo(json.dumps({"valid": False, "accepted": False, "error": exc.line()}, indent=2))
        raise
    result = verdict.result
    if token:
        from cove.attest import ear

        key = ear.VerifierKey.load_or_create(token_key or default_token_key())
        click.echo(
            ear.issue(key, verdict.appraisal, result, nonce=_hex(nonce, "--nonce"), issued_at=int(now.timestamp()))
        )
    elif as_json:
        from cove.attest.appraisal import summary

        click.echo(
            json.dumps(
                {
                    "valid": True,
                    "accepted": result.accepted,
                    "evidence_type": verdict.appraisal.evidence_type,
                    "policy": result.policy_id,
                    "components": dict(result.components),
                    "reasons": list(result.reasons),
                    "warnings": list(result.warnings),
                    "claims": summary(verdict.appraisal),
                    "details": dict(verdict.appraisal.claims),
                },
                indent=2,
            )
        )
    else:
        _print_human(verdict, _label(verdict.appraisal))
    if not result.accepted:
        raise PolicyRejected(f"rejected by policy {result.policy_id}: {'; '.join(result.reasons)}")
    if not token and not as_json:
        click.echo(f"accepted by policy {result.policy_id}")
    return 0


@click.command()
@click.option(
    "--token-key",
    type=InputPath(),
    help="Verifier signing key, which must exist (default: ~/.config/cove/verifier-key.pem, made on first use).",
)
def jwks(token_key: Path | None) -> None:
    """Print the JWKS document of the verifier key, for relying parties checking tokens."""
    from cove.attest import ear

    key = ear.VerifierKey.load_or_create(token_key or default_token_key())
    click.echo(json.dumps(ear.jwks([key]), indent=2))


COMMANDS = (verify, jwks)
