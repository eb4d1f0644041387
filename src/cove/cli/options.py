"""Option types shared by the command modules.

An option that names an input must point at something that exists: a typo
must not create a key, a folder tree or silently do nothing (docs/cli.md).
"""

from __future__ import annotations

from pathlib import Path

import click

from cove.errors import NotFoundError


class InputPath(click.ParamType):
    """A path that must exist (a file unless ``folder``); a missing one exits with ExitCode.NOT_FOUND."""

    name = "path"

    def __init__(self, folder: bool = False, kind: str | None = None):
        self.folder = folder
        self.kind = kind or ("folder" if folder else "file")

    def convert(self, value, param, ctx) -> Path:
        if isinstance(value, Path):
            path = value
        else:
            path = Path(value)
        option = param.opts[0] if param is not None and param.opts else "PATH"
        if not path.exists():
            raise NotFoundError(f"{option} {path}: no such {self.kind}", "check the path")
        if self.folder and not path.is_dir():
            raise NotFoundError(f"{option} {path}: not a folder")
        if not self.folder and path.is_dir():
            raise NotFoundError(f"{option} {path}: is a folder, expected a file")
        return path


class ParentExists(click.ParamType):
    """A path to be created whose parent folder must already exist (no folder tree from a typo)."""

    name = "path"

    def convert(self, value, param, ctx) -> Path:
        path = Path(value)
        option = param.opts[0] if param is not None and param.opts else "PATH"
        parent = path.parent
        if not path.exists() and not parent.is_dir():
            raise NotFoundError(
                f"{option} {path}: the folder {parent} does not exist", "create it first, or check the path"
            )
        return path
