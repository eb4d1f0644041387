"""Hostile config.json and process.json: one BundleError line naming the field, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cove.oci import cli, spec
from cove.oci.spec import BundleError
from tests.oci.helpers import SPEC, no_leftovers, one_line, runtime

DEEP = "[" * 100_000 + "]" * 100_000  # json.loads raises RecursionError, not ValueError


def _with(path: tuple[str, ...], value: Any) -> str:
    data = json.loads(json.dumps(SPEC))
    target = data
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    return json.dumps(data)


HOSTILE = [
    ("deep nesting", '{"ociVersion": "1.0.2", "x": ' + DEEP + "}", "not valid JSON"),
    ("trailing garbage", json.dumps(SPEC) + " {}", "not valid JSON"),
    ("not an object", "[1, 2]", "must hold a JSON object"),
    ("not UTF-8", b'{"ociVersion": "\xff"}', "not valid JSON"),
    ("too large", " " * ((4 << 20) + 1), "larger than 4 MiB"),
    ("capability not a name", _with(("process", "capabilities", "bounding"), [{}]), "list of names"),
    ("rlimit type a list", _with(("process", "rlimits"), [{"type": [], "soft": 1, "hard": 1}]), "rlimits entry"),
    (
        "rlimit a bool",
        _with(("process", "rlimits"), [{"type": "RLIMIT_NOFILE", "soft": True, "hard": 1}]),
        "rlimits entry",
    ),
    (
        "rlimit negative",
        _with(("process", "rlimits"), [{"type": "RLIMIT_NOFILE", "soft": -1, "hard": 1}]),
        "rlimits entry",
    ),
    ("mount type a list", _with(("mounts",), [{"destination": "/x", "type": ["proc"]}]), "mounts[0].type"),
    ("NUL in root.path", _with(("root", "path"), "rootfs\0x"), "NUL"),
    ("NUL in args", _with(("process", "args"), ["/bin/sh\0"]), "args must be"),
    ("NUL in env", _with(("process", "env"), ["A=\0"]), "NAME=VALUE"),
    ("args not strings", _with(("process", "args"), [1]), "args must be"),
    ("uid a bool", _with(("process", "user"), {"uid": True, "gid": 0}), "user.uid must be a int"),
    ("annotations not strings", _with(("annotations",), {"a": 1}), "annotations must map"),
]


@pytest.mark.parametrize("text, word", [(t, w) for _, t, w in HOSTILE], ids=[label for label, *_ in HOSTILE])
def test_hostile_config_is_one_bundle_error(tmp_path: Path, text: str | bytes, word: str) -> None:
    (tmp_path / "rootfs").mkdir()
    (tmp_path / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(BundleError, match=word.replace("[", r"\[").replace(".", r"\.")) as caught:
        spec.load(tmp_path)
    assert "\n" not in caught.value.line()


def test_cove_runtime_prints_one_line_for_a_deeply_nested_config(tmp_path: Path) -> None:
    """Through the command line (the review's reproduction): exit 2, one line, no traceback, nothing left."""
    (tmp_path / "bundle" / "rootfs").mkdir(parents=True)
    (tmp_path / "bundle" / "config.json").write_text('{"ociVersion": "1.0.2", "process": ' + DEEP + "}")
    result = runtime(tmp_path / "state", "create", "--bundle", str(tmp_path / "bundle"), "c")
    assert result.returncode == 2 and "not valid JSON" in one_line(result)
    no_leftovers(tmp_path / "state", "c")


def test_an_unexpected_error_is_one_line_and_exit_125(capsys: pytest.CaptureFixture[str]) -> None:
    """What commands.main and the hot path do with an exception nobody foresaw (a bug): no traceback."""
    options = cli.Options()
    assert cli.unexpected(options, RecursionError("maximum recursion depth\nexceeded")) == 125
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cove-runtime: error: internal error: RecursionError: ")
    options.debug = True
    with pytest.raises(RecursionError):
        cli.unexpected(options, RecursionError("shown with --debug"))
