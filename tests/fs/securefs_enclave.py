"""Enclaves with encrypted mounts for the secure file system end-to-end tests."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tests.conftest import ROOT, require
from tests.e2e.helpers import SHELL_TOOLS

PROBE = ROOT / "tests" / "fs" / "enclave_fsprobe.py"
PYTHON = "/usr/bin/python3.11"


def mount_block(
    target: str = "/data",
    key: str = "seal:mrenclave",
    source: str | None = None,
    options: str = "",
    writable: bool | None = None,
) -> str:
    text = f'\n[[mounts]]\ntarget = "{target}"\ntype = "encrypted"\nkey = "{key}"\n'
    if source is not None:
        text += f'source = "{source}"\n'
    if writable is not None:
        text += f"writable = {'true' if writable else 'false'}\n"
    if options:
        text += f"options = {{ {options} }}\n"
    return text


class Enclave:
    """An instance with Python and the fs probe; its cove.toml is rewritten per test."""

    def __init__(self, cove, root: Path, env: dict):
        self.cove = cove
        self.root = root
        self.env = env
        self.base = (root / "cove.toml").read_text()

    def configure(self, mounts: str, options: dict | None = None, build: bool = True) -> None:
        """cove.toml = the template + options ((section, key) -> value) + the mounts; then build."""
        text = self.base
        for (section, key), value in (options or {}).items():
            text = _set(text, section, key, value)
        (self.root / "cove.toml").write_text(text + mounts)
        if build:
            self.cove.ok("build", cwd=self.root, env=self.env)

    def run(self, *args: str, timeout: float = 300):
        return self.cove("run", *args, cwd=self.root, env=self.env, timeout=timeout)

    def probe(self, *args: str, timeout: float = 300):
        return self.run(PYTHON, "/app/enclave_fsprobe.py", *args, timeout=timeout)

    def probe_json(self, *args: str) -> dict:
        result = self.probe(*args)
        assert result.returncode == 0, result.stderr + result.stdout
        return json.loads(result.stdout.strip().splitlines()[-1])

    @property
    def state(self) -> Path:
        return self.root / "run"

    def reset_state(self) -> None:
        shutil.rmtree(self.state, ignore_errors=True)
        platform = Path(self.env["COVE_PLATFORM_DIR"]) / "volumes"
        shutil.rmtree(platform, ignore_errors=True)


def _set(text: str, section: str, key: str, value: str) -> str:
    """Set the template's `key = ...` line of [section] to value."""
    start = text.index(f"[{section}]\n")
    lines = text[start:].splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith(f"{key} = "):
            lines[i] = f"{key} = {value}\n"
            return text[:start] + "".join(lines)
    raise AssertionError(f"{section}.{key} is not in the template")


def make_python_enclave(cove, parent: Path, env: dict, name: str = "fsapp") -> Enclave:
    require("python3.11")
    require("fusermount3")
    cove.ok("new", name, cwd=parent, env=env)
    root = parent / name
    cove.ok("add", *SHELL_TOOLS, cwd=root, env=env)
    cove.ok("add", PYTHON, "/usr/lib/python3.11", cwd=root, env=env)
    cove.ok("add", "--to", "/app", str(PROBE), cwd=root, env=env)
    return Enclave(cove, root, env)


def platform_env(base: Path) -> dict:
    platform = base / "platform"
    platform.mkdir(exist_ok=True)
    os.chmod(platform, 0o700)
    return {"COVE_PLATFORM_DIR": str(platform)}
