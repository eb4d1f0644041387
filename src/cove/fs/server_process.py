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
from typing import IO, Any

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
        self.proc: subprocess.Popen[bytes] | None = None
        self.mountpoint: Path | None = None
        self.started = False
        fusermount = shutil.which("fusermount3", path=os.environ.get("PATH", "") + ":/usr/bin:/bin:/usr/sbin:/sbin")
        if fusermount is None or not os.path.exists("/dev/fuse"):
            raise SetupError("encrypted mounts need FUSE (fusermount3 and /dev/fuse)", "run scripts/setup (fuse3)")
        self.fusermount: str = fusermount

    def spawn(self) -> None:
        """Start the process early; it loads its modules, then waits for its settings."""
        if self.proc is None:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cove.fs.server"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
            )

    def _pipes(self, proc: subprocess.Popen[bytes]) -> tuple[IO[bytes], IO[bytes]]:
        """(stdin, stdout) of the server: spawn() opens both."""
        assert proc.stdin is not None and proc.stdout is not None
        return proc.stdin, proc.stdout

    def start(self, settings: dict[str, Any], mountpoint: Path) -> None:
        """Give the server its settings (on stdin) and wait until the volume is mounted."""
        self.mountpoint = mountpoint
        settings = dict(settings, mountpoint=str(mountpoint))
        self.spawn()
        assert self.proc is not None
        proc = self.proc
        stdin, stdout = self._pipes(proc)
        try:
            stdin.write(cbor2.dumps(settings))
            stdin.close()
        except BrokenPipeError:
            pass
        line = self._first_line(stdout)
        if line != "ready":
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            stdout.close()
            self.proc = None
            message = (
                line[len("error: ") :]
                if line.startswith("error: ")
                else f"the secure file system server failed ({line or 'no answer'})"
            )
            raise MountError(f"{self.name}: {message}")
        self.started = True

    def _first_line(self, out: IO[bytes]) -> str:
        deadline = time.monotonic() + START_TIMEOUT
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
        stdin, stdout = self._pipes(proc)
        if not self.started or self.mountpoint is None:  # spawned but never given settings: nothing to lose
            proc.kill()
            proc.wait()
            stdin.close()
            stdout.close()
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
        stdout.close()
        if code:
            print(
                f"cove: secure fs {self.name}: the server exited with {code}; changes after its last commit are lost",
                file=sys.stderr,
                flush=True,
            )
