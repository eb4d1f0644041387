"""The secure file system's server process, seen from the host: start it, mount, unmount.

:class:`FuseServer` starts ``python -m cove.fs.server`` outside the sandbox
with its settings (and keys) on stdin and waits until the volume is mounted;
after the program ends it unmounts, and the server commits. The runtime's
encrypted mounts (``cove.runtime.securefs_mounts``) and the encrypted image
(``cove.fs.encrypted_image``) both use it. This module imports nothing above ``fs``.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cbor2

from cove.errors import CoveError, SetupError

START_TIMEOUT = 120.0
STOP_TIMEOUT = 300.0


class MountError(CoveError):
    """An encrypted mount could not be served; the enclave does not start."""

    exit_code = 3


class FuseServer:
    """One ``python -m cove.fs.server`` process serving a volume at a mount point."""

    def __init__(self, name: str):
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.mountpoint: Path | None = None
        self.started = False
        self.fusermount = shutil.which("fusermount3", path=os.environ.get("PATH", "") + ":/usr/bin:/bin:/usr/sbin:/sbin")
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
