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

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import cbor2

from cove.config import Mount, parse_size
from cove.errors import CoveError, SetupError
from cove.runtime.backend import find_tool
from cove.runtime.services import Bind, EnclaveService, ServiceContext

START_TIMEOUT = 120.0
STOP_TIMEOUT = 300.0
DEFAULT_CACHE = 4 << 20


class MountError(CoveError):
    """An encrypted mount could not be served; the enclave does not start."""

    exit_code = 3


def volume_folder(mount: Mount, state_dir: Path) -> Path:
    """Where a mount's ciphertext lives: its source, relative to the state folder unless absolute."""
    source = Path(mount.source or mount.target.rstrip("/").rsplit("/", 1)[-1])
    return source if source.is_absolute() else state_dir / source


class FuseServer:
    """One ``python -m cove.fs.server`` process serving a volume at a mount point."""

    def __init__(self, name: str):
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.mountpoint: Path | None = None
        self.started = False
        self.fusermount = find_tool("fusermount3")
        if self.fusermount is None or not os.path.exists("/dev/fuse"):
            raise SetupError("encrypted mounts need FUSE (fusermount3 and /dev/fuse)", "run scripts/setup (fuse3)")

    def spawn(self) -> None:
        """Start the process early; it loads its modules, then waits for its settings."""
        if self.proc is None:
            self.proc = subprocess.Popen([sys.executable, "-m", "cove.fs.server"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, start_new_session=True, close_fds=True)

    def start(self, settings: dict, mountpoint: Path) -> None:
        """Give the server its settings (on stdin) and wait until the volume is mounted."""
        self.mountpoint = mountpoint
        settings = dict(settings, mountpoint=str(mountpoint))
        self.spawn()
        try:
            self.proc.stdin.write(cbor2.dumps(settings))
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        line = self._first_line()
        if line != "ready":
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
            self.proc = None
            message = line[len("error: "):] if line.startswith("error: ") else \
                f"the secure file system server failed ({line or 'no answer'})"
            raise MountError(f"{self.name}: {message}")
        self.started = True

    def _first_line(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        out = self.proc.stdout
        data = b""
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "no answer in time"
            ready, _, _ = select.select([out], [], [], remaining)
            if ready:
                chunk = os.read(out.fileno(), 4096)
                if not chunk:
                    break
                data += chunk
        return data.decode("utf-8", "replace").strip()

    def stop(self) -> None:
        """Unmount; the server commits and exits (or is made to)."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if not self.started:  # spawned but never given settings: it has nothing to lose
            proc.kill()
            proc.wait()
            proc.stdin.close()
            proc.stdout.close()
            return
        done = subprocess.run([self.fusermount, "-u", str(self.mountpoint)], capture_output=True)
        if done.returncode != 0 and os.path.ismount(self.mountpoint):
            subprocess.run([self.fusermount, "-u", "-z", str(self.mountpoint)], capture_output=True)
        try:
            code = proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        proc.stdout.close()
        if code:
            print(f"cove: secure fs {self.name}: the server exited with {code}; changes after its "
                  "last commit are lost", file=sys.stderr, flush=True)


class EncryptedMount(EnclaveService):
    def __init__(self, mount: Mount, index: int):
        self.mount = mount
        self.index = index
        self.server: FuseServer | None = None

    def begin(self, ctx: ServiceContext) -> None:
        """Spawn the server while the image is copied (keys are resolved in start)."""
        self.server = FuseServer(f"encrypted mount {self.mount.target}")
        self.server.spawn()

    def start(self, ctx: ServiceContext) -> list[Bind]:
        from cove.fs.access import Identity, resolve_keks

        server = self.server or FuseServer(f"encrypted mount {self.mount.target}")
        self.server = server
        folder = volume_folder(self.mount, ctx.state_dir)
        folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        mountpoint = ctx.workdir / f"securefs-{self.index}"
        mountpoint.mkdir(mode=0o700)
        options = dict(self.mount.options)
        identity = Identity.of(ctx.identity)
        try:
            keks = resolve_keks(str(folder), self.mount.key, identity)
        except CoveError as exc:
            raise MountError(f"encrypted mount {self.mount.target}: {exc.message}", exc.hint) from None
        settings = {
            "volume": str(folder), "label": self.mount.target,
            "key": self.mount.key, "identity": identity.to_cbor(), "keks": keks,
            "writable": self.mount.writable, "create": True, "anchor": options.get("rollback", "auto"),
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
    return [EncryptedMount(mount, index) for index, mount in enumerate(ctx.config.mounts)
            if mount.type == "encrypted"]
