"""/dev/attestation as a runtime service: one file-system process per enclave.

The runtime calls :func:`services` for every enclave it starts. The service
hands the enclave's identity (from the verified manifest, never from the
enclave) to a child process that mounts the file system in the run's
private folder, and binds that mount at /dev/attestation in the sandbox.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from cove.errors import CoveError, SetupError
from cove.platform import devattest
from cove.runtime import attestation_early
from cove.runtime.enclave_services import Bind, EnclaveService, ServiceContext

TARGET = "/dev/attestation"
START_TIMEOUT = 20.0


def identity_json(ctx: ServiceContext) -> str:
    i = ctx.identity
    return json.dumps(
        {
            "measurement": i.measurement.hex(),
            "signer": i.signer.hex(),
            "product_id": i.product_id,
            "svn": i.svn,
            "debug": i.debug,
            "backend": ctx.backend,
            "isolation": ctx.isolation,
            "instance_id": ctx.instance_id,
        }
    )


class AttestationService(EnclaveService):
    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.mountpoint: Path | None = None
        self.early_log: IO[bytes] | None = None
        self.buffer = b""  # what the server printed past the line read so far
        self.follower: threading.Thread | None = None
        self.stopping = threading.Event()

    def begin(self, ctx: ServiceContext) -> None:
        """Spawn the server now: its start-up overlaps with the runtime copying the image."""
        if not os.path.exists("/dev/fuse"):
            raise SetupError(
                "FUSE is not available (/dev/fuse), so /dev/attestation cannot be served", "run scripts/setup"
            )
        self.mountpoint = ctx.workdir / "attestation"
        self.mountpoint.mkdir(mode=0o755)
        early = attestation_early.take()
        if early is not None:  # prestarted: tell it where to mount
            self.process, self.early_log = early
            stdin = self.process.stdin
            assert stdin is not None  # spawned with a pipe
            stdin.write(str(self.mountpoint).encode() + b"\n")
        else:
            log = open(ctx.workdir / "attestation.log", "wb")
            try:
                self.process = attestation_early.spawn(self.mountpoint, log)
            finally:
                log.close()
            stdin = self.process.stdin
            assert stdin is not None  # spawned with a pipe
        try:
            stdin.write(identity_json(ctx).encode())
            stdin.close()
        except BrokenPipeError:
            pass  # it died: start() reports it with its last line

    def start(self, ctx: ServiceContext) -> list[Bind]:
        """Wait until the file system is mounted; a server still loading the platform key says ``mounted`` first,
        and the runtime goes on meanwhile. The sandbox's bind of the mount waits in the kernel for the key (the
        bind stats it): a key that fails then leaves the mount dead (ENOTCONN) and the run is refused."""
        if self.process is None:
            self.begin(ctx)  # a caller that did not begin early
        assert self.process is not None  # begin() started it
        try:
            line = self._line(self.process, time.monotonic() + START_TIMEOUT)
        except CoveError:
            self.stop()
            raise
        if line == "mounted":
            self.follower = threading.Thread(target=self._follow, args=(self.process,), daemon=True)
            self.follower.start()
        else:
            self._warn(line)
        assert self.mountpoint is not None  # begin() made it
        return [Bind(self.mountpoint, TARGET, writable=True)]

    @staticmethod
    def _warn(line: str) -> None:
        if line.startswith("ready none:"):
            print(
                f"cove: warning: /dev/attestation cannot quote: {line[len('ready none:') :].strip()}",
                file=sys.stderr,
                flush=True,
            )

    def _follow(self, process: subprocess.Popen) -> None:
        """After ``mounted``: the server's ``ready`` line, its warning, or the one line saying why it never came
        (then the server is ended, so the enclave's requests fail instead of waiting)."""
        try:
            self._warn(self._line(process, time.monotonic() + START_TIMEOUT))
        except CoveError as exc:
            if process.poll() is None:
                process.kill()  # the connection is aborted: the enclave's requests get ENOTCONN
            if not self.stopping.is_set():
                print(exc.line(), file=sys.stderr, flush=True)

    def _line(self, process: subprocess.Popen, deadline: float) -> str:
        """The server's next line on stdout; CoveError when it ends first or the deadline passes."""
        assert process.stdout is not None  # spawned with a pipe
        fd = process.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise CoveError("the /dev/attestation server did not start in time")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise CoveError(f"the /dev/attestation server failed to start{self._last_log_line()}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode(errors="replace")

    def _last_log_line(self) -> str:
        text = ""
        if self.early_log is not None:
            self.early_log.seek(0)
            text = self.early_log.read().decode(errors="replace")
        elif self.mountpoint is not None and (self.mountpoint.parent / "attestation.log").exists():
            text = (self.mountpoint.parent / "attestation.log").read_text(errors="replace")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return f": {lines[-1]}" if lines else ""

    def stop(self) -> None:
        """End the server, then detach its mount: it keeps no state, so there is nothing to wait for.

        The server goes first: one still loading the platform key answers nothing, so whatever touched its mount
        would wait for the key; killed, its connection is aborted and the mount answers ENOTCONN at once."""
        self.stopping.set()
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()  # its stdout ends, and the follower with it, before the streams are closed
        if self.follower is not None:
            self.follower.join(5)
            self.follower = None
        if process is not None:
            attestation_early.end(process)
        if self.early_log is not None:
            self.early_log.close()
            self.early_log = None
        if self.mountpoint is not None:
            devattest.unmount(str(self.mountpoint))


def services(ctx: ServiceContext) -> list[EnclaveService]:
    """Every enclave gets /dev/attestation; a vm guest's init serves its own (over virtio-serial)."""
    return [] if ctx.backend == "vm" else [AttestationService()]
