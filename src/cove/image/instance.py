"""The instance folder: cove.toml, image/, build/, run/.

An :class:`Instance` only knows where things are. Building lives in
:mod:`cove.image.build`; loading what was built, verified, in
:mod:`cove.image.artifacts`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cove import config as cove_config
from cove.errors import ConfigError, CoveError, NotFoundError, file_system_error
from cove.image.template import config_template

SKELETON = ("bin", "lib", "lib64", "etc", "tmp", "dev", "proc", "root")
SKELETON_MODES = {"tmp": 0o1777, "root": 0o700}


@dataclass(frozen=True)
class Instance:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "cove.toml"

    @property
    def image(self) -> Path:
        return self.root / "image"

    @property
    def build_dir(self) -> Path:
        return self.root / "build"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def config(self) -> cove_config.Config:
        return cove_config.load(self.config_path)


def open_instance(directory: Path) -> Instance:
    """The instance at directory, or one clear error if it is not one."""
    directory = Path(directory)
    if not directory.exists():
        raise NotFoundError(f"{directory} does not exist", "check the path, or pass -C DIR")
    if not (directory / "cove.toml").is_file():
        raise NotFoundError(
            f"{directory.resolve()} is not a Cove instance (no cove.toml)", "run `cove new NAME` or pass -C DIR"
        )
    return Instance(directory)


def create(directory: Path, name: str | None = None) -> Instance:
    """Make a new instance folder; never touches anything that already exists."""
    directory = Path(directory)
    name = name or directory.name
    if not name or not str(directory).strip():
        raise CoveError("cove new needs a NAME", "e.g. `cove new app`")
    try:
        cove_config.parse(config_template(name), source="template")  # the name must be valid
    except ConfigError as exc:
        raise ConfigError(f"cove new {name!r}: not a valid enclave name", exc.hint) from None
    if directory.exists():
        raise CoveError(f"{directory} already exists", "choose another name; cove new never overwrites")
    parent = directory.parent
    if not parent.is_dir():
        raise CoveError(f"{parent} does not exist")
    staging = parent / f".{directory.name}.cove-new"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        staging.mkdir(mode=0o755)
        (staging / "cove.toml").write_text(config_template(name), encoding="utf-8")
        for sub in ("image", "build", "run"):
            (staging / sub).mkdir()
        os.chmod(staging / "run", 0o700)
        for sub in SKELETON:
            path = staging / "image" / sub
            path.mkdir()
            os.chmod(path, SKELETON_MODES.get(sub, 0o755))
        os.rename(staging, directory)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise file_system_error(OSError(exc.errno, exc.strerror, str(directory)), "cannot create") from None
        raise
    return Instance(directory)
