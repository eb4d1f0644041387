"""What `cove kbs serve` runs with: the broker's settings from its state folder and the options given.

The defaults live here, next to the broker they configure, so the CLI only
parses and prints, and any other front end (a service unit, a test) starts a
broker with the same files found the same way: the master key (a sealed one
first), the TLS certificate made by `cove kbs init`, the collateral folder, and
an attestation policy checked before the broker starts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cove.errors import CoveError
from cove.kbs import vault
from cove.kbs.runner import default_db


def resolve(
    state: Path,
    *,
    db: str | None = None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    insecure_http: bool = False,
    master_key_file: Path | None = None,
    master_key_sealed: Path | None = None,
    policy: Path | None = None,
    sgx_root_ca: Path | None = None,
    snp_ask_ark: Sequence[Path] = (),
    tpm_ak: Sequence[Path] = (),
    collateral_dir: Path | None = None,
    pccs: str | None = None,
    issuer: str | None = None,
    session_lifetime: int = 300,
    token_lifetime: int = 3600,
    ra_tls: bool = False,
) -> dict[str, object]:
    """The server options (cove.kbs.server.settings_from_options) for a broker whose state is ``state``.

    Raises CoveError, one line with a hint, for a combination that cannot
    start: no state and no database, no TLS certificate, an attestation
    policy with release-only keys, --ra-tls with a certificate of its own.
    """
    if ra_tls and (certfile or keyfile or insecure_http):
        raise CoveError("--ra-tls makes its own certificate: it excludes --cert, --key and --insecure-http")
    if db is None and not state.exists():
        raise CoveError(f"no broker state in {state}", "run `cove kbs init` first")
    if policy is not None:
        check_attestation_policy(policy)
    if master_key_file is None and master_key_sealed is None and not os.environ.get(vault.ENV_VAR):
        if (state / "master.sealed").exists():
            master_key_sealed = state / "master.sealed"
        else:
            master_key_file = state / "master.key"
    plain = insecure_http or ra_tls  # RA-TLS makes its certificate when it starts
    if not plain:
        certfile = certfile or state / "tls.crt"
        keyfile = keyfile or state / "tls.key"
        if not certfile.is_file():
            raise CoveError(
                f"no TLS certificate {certfile}",
                "run `cove kbs init`, pass --cert/--key, or --insecure-http for local tests",
            )
    return {
        "db": db or default_db(state),
        "master_key_file": str(master_key_file) if master_key_file else None,
        "master_key_sealed": str(master_key_sealed) if master_key_sealed else None,
        "policy": str(policy) if policy else None,
        "sgx_root_ca": str(sgx_root_ca) if sgx_root_ca else None,
        "snp_ask_ark": [str(p) for p in snp_ask_ark],
        "tpm_ak": [str(p) for p in tpm_ak],
        "collateral_dir": str(collateral_dir or state / "collateral"),
        "pccs": pccs,
        "issuer": issuer,
        "session_lifetime": session_lifetime,
        "token_lifetime": token_lifetime,
        "certfile": None if plain else str(certfile),
        "keyfile": None if plain else str(keyfile),
    }


def check_attestation_policy(path: Path) -> None:
    """Refuse, naming the file, an attestation policy that cannot be one (as `cove verify --policy` does)."""
    from cove.attest.policy import load_policy

    rules = load_policy(path).rules
    if any(r.wants_init_data for r in rules.values()):  # the attestation policy sees no init-data
        raise CoveError(
            f"policy {path}: init_data_digests and init_data belong in release policies "
            "(`cove kbs admin policy put`), not in the attestation policy",
            "move those keys into the release policy of the secrets they guard",
        )
