"""Shared fixtures: the real cove command, real tools, no silent skips.

A missing system dependency fails the test with the setup command to run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COVE = str(Path(sys.executable).parent / "cove")
SETUP_HINT = "run `sudo scripts/setup` to install Cove's system packages"


def require(tool: str) -> str:
    """The path of a system tool, or a test failure naming the setup command."""
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        pytest.fail(f"{tool} is not installed: {SETUP_HINT}", pytrace=False)
    return path


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class Cove:
    """Runs the installed `cove` command with a private key folder."""

    def __init__(self, home: Path):
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("COVE_")}
        self.env["XDG_CONFIG_HOME"] = str(home)
        self.env["HOME"] = str(home)

    def __call__(self, *args: str, cwd: Path | None = None, input: str | None = None,
                 timeout: float = 120, env: dict | None = None) -> Result:
        full_env = dict(self.env, **(env or {}))
        proc = subprocess.run([COVE, *map(str, args)], cwd=cwd, input=input, capture_output=True,
                              text=True, timeout=timeout, env=full_env)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def ok(self, *args: str, **kwargs) -> Result:
        result = self(*args, **kwargs)
        assert result.returncode == 0, f"cove {' '.join(map(str, args))} failed:\n{result.stderr}"
        return result

    def popen_args(self, *args: str) -> list[str]:
        return [COVE, *map(str, args)]

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.popen_args(*args), env=self.env, **kwargs)


@pytest.fixture(scope="session")
def cove(tmp_path_factory) -> Cove:
    require("bwrap")
    return Cove(tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="session")
def probe(tmp_path_factory) -> Path:
    """A small C program that tests isolation from inside the enclave."""
    require("gcc")
    out = tmp_path_factory.mktemp("probe") / "probe"
    subprocess.run(["gcc", "-O1", "-Wall", "-o", str(out), str(ROOT / "tests" / "e2e" / "probe.c")],
                   check=True)
    return out


def error_line(result: Result) -> str:
    """The single error line cove printed; fails if there is not exactly one."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {result.stderr!r}"
    assert "Traceback" not in result.stderr
    return lines[0]
