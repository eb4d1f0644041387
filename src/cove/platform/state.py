"""Where the platform monitor keeps its state, and the lock that serializes changes to it.

Everything lives in one root-only folder (``/var/lib/cove/platform``, or
``$COVE_PLATFORM_DIR``): the platform attestation key (sealed to the TPM when
there is one), the endorsement of the current epoch, the TPM settings and,
for development, the swtpm. ``platform.json`` records the choices made at
``cove platform init``.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from collections.abc import Iterator

from cove.decode import Fields, decode_json
from cove.errors import CoveError
from cove.util import write_atomic

DEFAULT_DIR = Path("/var/lib/cove/platform")
CONFIG_VERSION = 1
MAX_CONFIG = 1 << 16  # platform.json is a few hundred bytes


def platform_dir() -> Path:
    return Path(os.environ.get("COVE_PLATFORM_DIR") or DEFAULT_DIR)


@dataclass(frozen=True)
class PlatformConfig:
    """The platform's settings; ``tcti`` is None for a self-certified platform."""

    root: str  # "tpm" or "self-certified"
    tcti: str | None = None
    swtpm: bool = False
    pcr: int = 23
    ak_handle: int = 0x81018000
    ak_ca: str | None = None  # folder of the AK CA that certified the AK
    version: int = CONFIG_VERSION


def _optional_text(f: Fields, key: str) -> str | None:
    value = f.value(key, (str, type(None)), None)
    if value is not None and (not isinstance(value, str) or len(value) > 4096):
        raise f.fail(key, "must be at most 4096 characters")
    return value


class Paths:
    """The files of one platform folder."""

    def __init__(self, directory: Path | None = None):
        self.dir = Path(directory) if directory is not None else platform_dir()
        self.config = self.dir / "platform.json"
        self.pak = self.dir / "pak.pem"  # only without a TPM
        self.pak_public = self.dir / "pak.pub.der"
        self.pak_sealed_pub = self.dir / "pak.sealed.pub"
        self.pak_sealed_priv = self.dir / "pak.sealed.priv"
        self.endorsement = self.dir / "endorsement.cbor"
        self.ek_chain = self.dir / "ek-chain.pem"
        self.ak_public = self.dir / "ak.pub"
        self.ak_chain = self.dir / "ak-chain.pem"
        self.local_ak_ca = self.dir / "ak-ca"
        self.swtpm = self.dir / "swtpm"
        self.lock = self.dir / ".lock"

    def ensure(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.dir, 0o700)
        except OSError as exc:
            raise CoveError(
                f"cannot create the platform folder {self.dir}: {exc.strerror}",
                "run as root, or set COVE_PLATFORM_DIR to a folder you own",
            ) from None

    def read_config(self) -> PlatformConfig | None:
        """platform.json through cove.decode; damaged (bad JSON, a wrong type, an unknown key) is one CoveError."""
        try:
            with open(self.config, "rb") as stream:
                raw = stream.read(MAX_CONFIG + 1)
        except FileNotFoundError:
            return None
        except PermissionError:
            raise CoveError(f"cannot read {self.config}", "the platform is root-only: run as root") from None
        except OSError as exc:
            raise CoveError(f"cannot read {self.config}: {exc.strerror}", "run `cove platform init --force`") from None

        def damaged(message: str) -> CoveError:
            return CoveError(f"{self.config} is damaged: {message}", "run `cove platform init --force`")

        data = decode_json(raw, damaged, "it", limit=MAX_CONFIG)
        f = Fields(data, "the config", damaged, [field.name for field in fields(PlatformConfig)])
        if f.map.get("version") != CONFIG_VERSION:
            raise CoveError(f"{self.config} has an unknown version", "run `cove platform init --force`")
        return PlatformConfig(
            root=f.text("root", ("tpm", "self-certified")),
            tcti=_optional_text(f, "tcti"),
            swtpm=f.boolean("swtpm", False),
            pcr=f.integer("pcr", 0, 23, default=23),
            ak_handle=f.integer("ak_handle", 0, 2**32 - 1, default=0x81018000),
            ak_ca=_optional_text(f, "ak_ca"),
        )

    def write_config(self, config: PlatformConfig) -> None:
        write_atomic(self.config, (json.dumps(asdict(config), indent=2) + "\n").encode(), mode=0o600)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive hold on the platform (init, epoch refresh, TPM use)."""
        self.ensure()
        try:
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise CoveError(f"cannot lock the platform folder {self.dir}: {exc.strerror}", "run as root") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
