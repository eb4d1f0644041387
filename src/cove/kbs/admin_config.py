"""Where `cove kbs admin` finds its broker, and new admin key files.

An admin key file (JSON: name, audience, url, jwk; docs/kbs.md) is made by
`cove kbs init` for the first admin and by :func:`new_key_file` for others.
:func:`connect` finds the broker's URL in it when none is given, and trusts
the state folder's own TLS CA for an https broker, so an admin on the
broker's machine needs no options.
"""

from __future__ import annotations

import json
from pathlib import Path

from joserfc import jwk

from cove.decode import decode_json
from cove.errors import CoveError
from cove.kbs.client import AdminClient
from cove.util import write_atomic


class _Unreadable(Exception):
    """The key file cannot give a URL (AdminClient.from_file names what is wrong with it)."""


def connect(
    state: Path,
    url: str | None = None,
    key: Path | None = None,
    ca: Path | None = None,
    broker_policy: str | None = None,
) -> AdminClient:
    """An admin client: ``key`` defaults to STATE/admin.json, ``url`` to its "url", ``ca`` to STATE/tls-ca.pem."""
    key = key or state / "admin.json"
    if url is None:
        url = url_of(key)
    if not url:
        raise CoveError("no broker URL", "pass --url or set $COVE_KBS_URL")
    if broker_policy is not None:
        if ca is not None:
            raise CoveError("--ca and --kbs-policy exclude each other")
    elif ca is None and (state / "tls-ca.pem").is_file() and url.startswith("https"):
        ca = state / "tls-ca.pem"
    return AdminClient.from_file(url, key, ca, broker_policy=broker_policy)


def url_of(key: Path) -> str | None:
    """The broker URL recorded in an admin key file, or None (missing, unreadable, or none recorded)."""
    try:
        data = decode_json(key.read_bytes(), _Unreadable, str(key))
    except (OSError, _Unreadable):
        return None
    url = data.get("url") if isinstance(data, dict) else None
    return url if isinstance(url, str) else None


def new_key_file(name: str, out: Path) -> Path:
    """Write a new admin's key pair: ``out`` (private, 0600) and OUT.pub.json (to register); its path."""
    if out.exists():
        raise CoveError(f"{out} exists")
    pair = jwk.generate_key("EC", "P-256")
    write_atomic(
        out,
        json.dumps({"name": name, "audience": None, "url": None, "jwk": pair.as_dict(private=True)}, indent=2).encode(),
        mode=0o600,
    )
    public = Path(str(out) + ".pub.json")
    write_atomic(public, json.dumps(pair.as_dict(private=False), indent=2).encode())
    return public
