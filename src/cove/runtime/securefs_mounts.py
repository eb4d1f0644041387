"""Encrypted mounts as an enclave service: one FUSE server per ``[[mounts]] type = "encrypted"``.

For each mount the service resolves the volume key here (in ``cove run``,
which holds the enclave's verified identity and whatever the key broker
released), starts ``python -m cove.fs.server`` outside the sandbox with the
key on its stdin, waits until the volume is mounted under the run's private
folder, and hands the launcher a bind of that folder at the mount's target.
The enclave sees plain files; the host's folder holds only ciphertext.
After the program ends the mount is unmounted and the server commits.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cove.config import Mount, parse_size
from cove.errors import CoveError
from cove.runtime.enclave_services import Bind, EnclaveService, ServiceContext

if TYPE_CHECKING:  # cove.fs loads only for an encrypted mount: every launch imports this module (~8 ms of CPU)
    from cove.fs.server_process import FuseServer

DEFAULT_CACHE = 4 << 20


def volume_folder(mount: Mount, state_dir: Path) -> Path:
    """Where a mount's ciphertext lives: its source, relative to the state folder unless absolute."""
    source = Path(mount.source or mount.target.rstrip("/").rsplit("/", 1)[-1])
    return source if source.is_absolute() else state_dir / source


class EncryptedMount(EnclaveService):
    def __init__(self, mount: Mount, index: int):
        self.mount = mount
        self.index = index
        self.server: FuseServer | None = None

    def begin(self, ctx: ServiceContext) -> None:
        """Spawn the server while the image is copied (keys are resolved in start)."""
        from cove.fs.server_process import FuseServer

        self.server = FuseServer(f"encrypted mount {self.mount.target}")
        self.server.spawn()

    def start(self, ctx: ServiceContext) -> list[Bind]:
        from cove.fs.access import Identity, resolve_keks
        from cove.fs.server_process import FuseServer, MountError

        server = self.server or FuseServer(f"encrypted mount {self.mount.target}")
        self.server = server
        folder = volume_folder(self.mount, ctx.state_dir)
        folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        mountpoint = ctx.workdir / f"securefs-{self.index}"
        mountpoint.mkdir(mode=0o700)
        options = dict(self.mount.options)
        identity = Identity.of(ctx.identity)
        if self.mount.key is None:  # config requires a key for an encrypted mount
            raise MountError(f"encrypted mount {self.mount.target}: no key source")
        try:
            keks = resolve_keks(str(folder), self.mount.key, identity)
        except CoveError as exc:
            raise MountError(f"encrypted mount {self.mount.target}: {exc.message}", exc.hint) from None
        settings = {
            "volume": str(folder),
            "label": self.mount.target,
            "key": self.mount.key,
            "identity": identity.to_cbor(),
            "keks": keks,
            "writable": self.mount.writable,
            "create": True,
            "anchor": options.get("rollback", "auto"),
            "cache": parse_size(options["cache"]) if "cache" in options else DEFAULT_CACHE,
        }
        server.start(settings, mountpoint)
        return [Bind(mountpoint, self.mount.target, self.mount.writable)]

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def services(ctx: ServiceContext) -> list[EnclaveService]:
    """The factory the launcher calls: a FUSE server per encrypted mount."""
    return [EncryptedMount(mount, index) for index, mount in enumerate(ctx.config.mounts) if mount.type == "encrypted"]
