"""/dev/attestation as a runtime service: one file-system process per enclave.

The runtime calls :func:`services` for every enclave it starts. The service
hands the enclave's identity (from the verified manifest, never from the
enclave) to a child process that mounts the file system in the run's
private folder, and binds that mount at /dev/attestation in the sandbox.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from cove.errors import CoveError, SetupError
from cove.runtime.enclave_services import Bind, EnclaveService, ServiceContext

TARGET = "/dev/attestation"
PR_SET_PDEATHSIG = 1
START_TIMEOUT = 20.0


def identity_json(ctx: ServiceContext) -> str:
    i = ctx.identity
    return json.dumps({"measurement": i.measurement.hex(), "signer": i.signer.hex(), "product_id": i.product_id,
                       "svn": i.svn, "debug": i.debug, "backend": ctx.backend, "isolation": ctx.isolation,
                       "instance_id": ctx.instance_id})


def _die_with_parent() -> None:
    """In the child: get SIGTERM when ``cove run`` dies, even by SIGKILL, so the mount never outlives it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _unmount(path: Path) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool and os.path.ismount(path):
        subprocess.run([tool, "-u", "-z", str(path)], capture_output=True, timeout=10)


class AttestationService(EnclaveService):
    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.mountpoint: Path | None = None

    def begin(self, ctx: ServiceContext) -> None:
        """Spawn the server now: its start-up overlaps with the runtime copying the image."""
        if not os.path.exists("/dev/fuse"):
            raise SetupError("FUSE is not available (/dev/fuse), so /dev/attestation cannot be served",
                             "run scripts/setup")
        self.mountpoint = ctx.workdir / "attestation"
        self.mountpoint.mkdir(mode=0o755)
        log = open(ctx.workdir / "attestation.log", "wb")
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cove.platform.devattest_server", str(self.mountpoint)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, close_fds=True,
                start_new_session=True,  # the user's ^C reaches the enclave, not this server
                preexec_fn=_die_with_parent)
        finally:
            log.close()
        self.process.stdin.write(identity_json(ctx).encode())
        self.process.stdin.close()

    def start(self, ctx: ServiceContext) -> list[Bind]:
        if self.process is None:
            self.begin(ctx)  # a caller that did not begin early
        line = self._ready_line()
        if line.startswith("ready none:"):
            print(f"cove: warning: /dev/attestation cannot quote: {line[len('ready none:'):].strip()}",
                  file=sys.stderr, flush=True)
        return [Bind(self.mountpoint, TARGET, writable=True)]

    def _ready_line(self) -> str:
        assert self.process is not None and self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + START_TIMEOUT
        buffer = b""
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.stop()
                raise CoveError("the /dev/attestation server did not start in time")
            chunk = os.read(fd, 4096)
            if not chunk:
                self.stop()
                log = (self.mountpoint.parent / "attestation.log") if self.mountpoint else None
                last = ""
                if log and log.exists():
                    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
                    last = f": {lines[-1]}" if lines else ""
                raise CoveError(f"the /dev/attestation server failed to start{last}")
            buffer += chunk
        return buffer.split(b"\n", 1)[0].decode(errors="replace")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.stdout is not None:
                process.stdout.close()
        if self.mountpoint is not None:
            _unmount(self.mountpoint)


def services(ctx: ServiceContext) -> list[EnclaveService]:
    """Every enclave gets /dev/attestation; a vm guest's init serves its own (over virtio-serial)."""
    return [] if ctx.backend == "vm" else [AttestationService()]
