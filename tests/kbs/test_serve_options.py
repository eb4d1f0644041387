"""The broker settings `cove kbs serve` and `cove kbs admin` find on their own (kbs.serve_options, kbs.admin_config).

The CLI only parses and prints; what it resolves is checked here, on real
state folders, without starting a broker (tests/kbs/test_cli.py runs the commands).
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from cove.errors import CoveError
from cove.kbs import admin_config, serve_options, vault


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(vault.ENV_VAR, raising=False)
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / "tls.crt").write_text("certificate")
    return folder


def test_defaults_come_from_the_state_folder(state: Path) -> None:
    options = serve_options.resolve(state)
    assert options["db"] == f"sqlite:///{state / 'kbs.db'}"
    assert options["master_key_file"] == str(state / "master.key") and options["master_key_sealed"] is None
    assert (options["certfile"], options["keyfile"]) == (str(state / "tls.crt"), str(state / "tls.key"))
    assert options["collateral_dir"] == str(state / "collateral")
    (state / "master.sealed").write_bytes(b"sealed")  # a sealed master key is preferred
    options = serve_options.resolve(state, insecure_http=True)
    assert options["master_key_sealed"] == str(state / "master.sealed") and options["master_key_file"] is None
    assert options["certfile"] is None and options["keyfile"] is None


def test_the_environment_master_key_wins(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vault.ENV_VAR, "00" * 32)
    options = serve_options.resolve(state)
    assert options["master_key_file"] is None and options["master_key_sealed"] is None


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"ra_tls": True, "insecure_http": True}, "--ra-tls makes its own certificate"),
        ({"ra_tls": True, "certfile": Path("/c.pem")}, "--ra-tls makes its own certificate"),
        ({"certfile": Path("/nonexistent/tls.crt")}, "no TLS certificate /nonexistent/tls.crt"),
    ],
)
def test_combinations_that_cannot_start(state: Path, kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(CoveError, match=fragment):
        serve_options.resolve(state, **kwargs)  # type: ignore[arg-type]


def test_no_state_and_no_database(tmp_path: Path) -> None:
    with pytest.raises(CoveError, match="no broker state in") as caught:
        serve_options.resolve(tmp_path / "missing")
    assert caught.value.hint == "run `cove kbs init` first"


def test_an_attestation_policy_with_release_keys_is_refused(state: Path, tmp_path: Path) -> None:
    policy = tmp_path / "attest.toml"
    policy.write_text('types = ["sample"]\n[sample]\ninit_data_digests = ["' + "00" * 32 + '"]\n')
    with pytest.raises(CoveError, match="belong in release policies"):
        serve_options.resolve(state, policy=policy)


def test_a_new_admin_key_file(tmp_path: Path) -> None:
    out = tmp_path / "bob.json"
    public = admin_config.new_key_file("bob", out)
    private = json.loads(out.read_text())
    assert private["name"] == "bob" and "d" in private["jwk"] and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert public == tmp_path / "bob.json.pub.json" and "d" not in json.loads(public.read_text())
    with pytest.raises(CoveError, match="exists"):
        admin_config.new_key_file("bob", out)


@pytest.mark.parametrize(
    ("content", "url"),
    [
        (b'{"url": "https://kbs.example"}', "https://kbs.example"),
        (b'{"url": 5}', None),  # a URL that is not text
        (b'["https://kbs.example"]', None),  # not an object
        (b'{"url": "x"} trailing', None),
        (b"[" * 100_000, None),  # nested past the parser's recursion
        (b"\xff\xfe", None),  # not UTF-8
        (None, None),  # no file
    ],
)
def test_the_url_in_an_admin_key_file(tmp_path: Path, content: bytes | None, url: str | None) -> None:
    key = tmp_path / "admin.json"
    if content is not None:
        key.write_bytes(content)
    assert admin_config.url_of(key) == url


def test_connect_needs_a_url_and_one_way_to_trust_the_broker(tmp_path: Path) -> None:
    key = tmp_path / "admin.json"
    key.write_bytes(b'{"url": 5}')
    with pytest.raises(CoveError, match="no broker URL"):
        admin_config.connect(tmp_path, key=key)
    with pytest.raises(CoveError, match="--ca and --kbs-policy exclude each other"):
        admin_config.connect(tmp_path, "https://k", key, tmp_path / "ca.pem", "policy")
