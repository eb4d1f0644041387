"""An admin key file is read through cove.decode: a hostile one is one KbsError (exit 2), never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from joserfc import jwk

from cove.errors import ExitCode
from cove.kbs.client import AdminClient, KbsError
from tests.conftest import Cove, error_line

JWK = jwk.generate_key("EC", "P-256").as_dict(private=True)
GOOD = {"name": "ops", "audience": "kbs-1", "url": None, "jwk": JWK}


def test_a_key_file_reads_back(tmp_path: Path) -> None:
    (tmp_path / "admin.json").write_text(json.dumps(GOOD))
    client = AdminClient.from_file("http://127.0.0.1:9", tmp_path / "admin.json")
    try:
        assert (client.key_name, client.audience) == ("ops", "kbs-1")
    finally:
        client.close()


HOSTILE = [
    (json.dumps(dict(GOOD, jwk={"kty": "EC"})), "'crv' is required"),  # joserfc's error escaped as a traceback
    ("[" * 20000 + "]" * 20000, "not valid JSON"),  # RecursionError escaped as a traceback
    (json.dumps(GOOD) + " {}", "not valid JSON"),
    (json.dumps(dict(GOOD, name=["ops"])), "name must be a short text string"),  # old: accepted, sent in every token
    (json.dumps(dict(GOOD, audience=7)), "audience must be str or NoneType"),
    (json.dumps(dict(GOOD, jwk="key")), "jwk must be dict"),
    (json.dumps([GOOD]), "must be a map"),
]


@pytest.mark.parametrize("text, reason", HOSTILE, ids=[r for _, r in HOSTILE])
def test_a_hostile_key_file_is_one_usage_error(tmp_path: Path, text: str, reason: str) -> None:
    (tmp_path / "admin.json").write_text(text)
    with pytest.raises(KbsError, match=reason) as caught:
        AdminClient.from_file("http://127.0.0.1:9", tmp_path / "admin.json")
    assert caught.value.exit_code == ExitCode.USAGE and "is not a Cove admin key" in caught.value.message


def test_cli_with_a_hostile_key_file_prints_one_line(cove: Cove, tmp_path: Path) -> None:
    (tmp_path / "admin.json").write_text(HOSTILE[0][0])
    result = cove(
        "kbs", "admin", "--url", "http://127.0.0.1:9", "--key", str(tmp_path / "admin.json"), "policy", "list"
    )
    assert result.returncode == ExitCode.USAGE and "Traceback" not in result.stderr
    assert "is not a Cove admin key" in error_line(result)
