"""Building real instances for end-to-end tests."""

from __future__ import annotations

import re
from pathlib import Path

SHELL_TOOLS = ("/bin/sh", "/bin/cat", "/bin/ls", "/bin/echo", "/bin/sleep", "/usr/bin/id", "/usr/bin/head")


def set_option(config: Path, section: str, key: str, value: str) -> None:
    """Set key = value in [section] of a cove.toml (the template has every key)."""
    text = config.read_text()
    pattern = re.compile(rf"(\[{re.escape(section)}\][^\[]*?^){re.escape(key)} = [^\n#]*", re.M | re.S)
    new, count = pattern.subn(lambda m: f"{m.group(1)}{key} = {value} ", text, count=1)
    assert count == 1, f"{section}.{key} not found in {config}"
    config.write_text(new)


def make_instance(cove, parent: Path, probe: Path | None = None, name: str = "app",
                  options: dict | None = None, extra: str = "", build: bool = True) -> Path:
    """cove new + add (probe and shell tools) + options + build; returns the instance folder."""
    cove.ok("new", name, cwd=parent)
    root = parent / name
    cove.ok("add", *SHELL_TOOLS, cwd=root)
    if probe is not None:
        cove.ok("add", "--to", "/bin", str(probe), cwd=root)
    for (section, key), value in (options or {}).items():
        set_option(root / "cove.toml", section, key, value)
    if extra:
        with open(root / "cove.toml", "a") as handle:
            handle.write(extra)
    if build:
        cove.ok("build", cwd=root)
    return root
