"""What `cove-runtime exec` admits, checked without a container: the program it runs is the one it checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cove.oci.execute import helper_spec
from cove.oci.spec import BundleError, Process
from cove.util import entry_point_allows


@pytest.fixture
def enclave_root(tmp_path: Path) -> Path:
    """A private root with a program in the entry-point folder /opt/app/ and a shell outside it."""
    for name in ("opt/app/bin/tool", "bin/sh"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    return tmp_path


def _allowed(root: Path, entry_points: list[str], debug: bool = False) -> dict[str, Any]:
    return {
        "uid": 0,
        "gid": 0,
        "cwd": "/",
        "env": {},
        "passthrough": [],
        "secret_env": [],
        "max_open_files": 1024,
        "seccomp": "",
        "entry_points": entry_points,
        "debug": debug,
        "root": str(root),
    }


def _process(args: list[str], path: str = "/opt/app/bin") -> Process:
    return Process(tuple(args), {"PATH": path}, "/", 0, 0, False)


@pytest.mark.parametrize(
    "args, path, word",
    [
        (["../../../bin/sh"], "/opt/app/bin", "relative path"),  # the review's reproduction
        (["bin/../../../bin/sh"], "/opt/app", "relative path"),
        (["/opt/app/../../bin/sh"], "/opt/app/bin", "not an entry point"),
        (["sh"], "/opt/app/../../bin", "not an entry point"),  # a PATH folder with "..": normalised, then checked
    ],
)
def test_a_path_out_of_the_entry_points_is_refused(enclave_root: Path, args: list[str], path: str, word: str) -> None:
    with pytest.raises(BundleError, match=word):
        helper_spec(_process(args, path), _allowed(enclave_root, ["/opt/app/"]))


@pytest.mark.parametrize(
    "args, path", [(["tool"], "/opt/app/bin"), (["/opt/app/bin/./tool"], ""), (["tool"], "/opt/app/x/../bin")]
)
def test_the_normalised_program_is_what_runs(enclave_root: Path, args: list[str], path: str) -> None:
    request = helper_spec(_process([*args, "-v"], path), _allowed(enclave_root, ["/opt/app/"]))
    assert request["argv"] == ["/opt/app/bin/tool", "-v"]


def test_a_debug_enclave_still_gets_a_normalised_absolute_path(enclave_root: Path) -> None:
    request = helper_spec(_process(["sh"], "/opt/app/../../bin"), _allowed(enclave_root, ["/opt/app/"], True))
    assert request["argv"] == ["/bin/sh"]
    with pytest.raises(BundleError, match="relative path"):
        helper_spec(_process(["../../../bin/sh"]), _allowed(enclave_root, ["/opt/app/"], True))


@pytest.mark.parametrize(
    "program, admitted",
    [
        ("/opt/app/bin/tool", True),
        ("/usr/bin/env", True),
        ("/usr/bin/envx", False),
        ("/opt/app/../../bin/sh", False),
        ("/opt/app/./bin/tool", False),
        ("../opt/app/tool", False),
        ("opt/app/tool", False),
        ("/opt/application", False),
        ("//opt/app/tool", False),
    ],
)
def test_entry_point_allows(program: str, admitted: bool) -> None:
    """The one check the launcher, the node service and cove-runtime share: absolute, normalised paths only."""
    assert entry_point_allows(program, ("/opt/app/", "/usr/bin/env")) is admitted
