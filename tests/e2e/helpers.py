"""Building real instances for end-to-end tests."""

from __future__ import annotations

import re
from pathlib import Path

SHELL_TOOLS = ("/bin/sh", "/bin/cat", "/bin/ls", "/bin/echo", "/bin/sleep", "/usr/bin/id", "/usr/bin/head")


def set_option(config: Path, section: str, key: str, value: str) -> None:
    """Set key = value in [section] of a cove.toml (the template has every key)."""
    lines = config.read_text().splitlines(keepends=True)
    header = re.compile(r"^\[\[?[^\]]+\]\]?\s*(#.*)?$")
    inside = False
    for index, line in enumerate(lines):
        if header.match(line):
            inside = line.strip() == f"[{section}]"
        elif inside and re.match(rf"^{re.escape(key)} = ", line):
            comment = line.partition(" #")[2]
            lines[index] = f"{key} = {value}" + (f" #{comment}" if comment else "\n")
            config.write_text("".join(lines))
            return
    raise AssertionError(f"{section}.{key} not found in {config}")


def make_instance(
    cove,
    parent: Path,
    probe: Path | None = None,
    name: str = "app",
    options: dict | None = None,
    extra: str = "",
    build: bool = True,
) -> Path:
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
