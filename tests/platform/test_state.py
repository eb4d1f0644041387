"""platform.json is read through cove.decode: a damaged or hostile file is one CoveError, never a wrong config."""

from __future__ import annotations

import json

import pytest

from cove.errors import CoveError
from cove.platform.state import Paths, PlatformConfig
from tests.conftest import Cove, error_line


def test_the_written_config_reads_back(platform_paths: Paths) -> None:
    platform_paths.ensure()
    config = PlatformConfig(root="tpm", tcti="swtpm:port=2321", swtpm=True, pcr=16, ak_ca="/ca")
    platform_paths.write_config(config)
    assert platform_paths.read_config() == config


HOSTILE = [
    ("[" * 20000 + "]" * 20000, "not valid JSON"),  # the old json.loads raised RecursionError, uncaught
    ('{"version": 1, "root": "tpm", "pcr": "16"}', "pcr must be an integer from 0 to 23"),  # old: accepted
    ('{"version": 1, "root": "tpm", "tcti": 5}', "tcti must be str or NoneType"),  # old: accepted
    ('{"version": 1, "root": "cloud"}', "root 'cloud' is not one of tpm, self-certified"),
    ('{"version": 1, "root": "tpm", "swtpm": "false"}', "swtpm must be true or false"),
    ('{"version": 1, "root": "tpm"} x', "not valid JSON"),
    ('{"version": 1, "root": "tpm", "extra": 1}', "unknown field 'extra'"),
    ('["version", 1]', "must be a map"),
    ('{"version": 99}', "unknown version"),
]


@pytest.mark.parametrize("text,problem", HOSTILE, ids=[p for _, p in HOSTILE])
def test_a_damaged_config_is_one_error(platform_paths: Paths, text: str, problem: str) -> None:
    platform_paths.ensure()
    platform_paths.config.write_text(text)
    with pytest.raises(CoveError, match=problem) as caught:
        platform_paths.read_config()
    assert caught.value.hint == "run `cove platform init --force`"


def test_cli_status_on_a_deeply_nested_config_is_one_line(cove: Cove, platform_paths: Paths) -> None:
    platform_paths.ensure()
    platform_paths.config.write_text(json.dumps({"version": 1, "root": "tpm"})[:-1] + ', "a": ' + "[" * 20000)
    result = cove("platform", "status", env={"COVE_PLATFORM_DIR": str(platform_paths.dir)})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "is damaged: it is not valid JSON" in error_line(result)
