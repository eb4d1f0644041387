"""The per-run /dev/attestation server started early: before `cove run` has verified anything.

Standard library only, so `cove run`'s plain form can start the server's
interpreter first thing (cove.cli.attached); it loads the platform key (and
opens the TPM) while the runtime is imported and the build verified, and
waits on stdin meanwhile for its mountpoint and the enclave's identity
(cove.runtime.attestation_service takes it). A server no enclave
takes is ended by :func:`discard`, and dies with its parent in any case.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

from cove import util

_early: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []


def die_with_parent() -> None:
    """In the child: get SIGTERM when ``cove run`` dies, even by SIGKILL, so the mount never outlives it."""
    util.die_with_parent(signal.SIGTERM)


def spawn(mountpoint: Path | None, log: IO[bytes] | int) -> subprocess.Popen[bytes]:
    """The server (``python -m cove.platform.devattest_server``); without a mountpoint it reads one first."""
    return subprocess.Popen(
        [sys.executable, "-m", "cove.platform.devattest_server", *([str(mountpoint)] if mountpoint else [])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        close_fds=True,
        start_new_session=True,  # the user's ^C reaches the enclave, not this server
        preexec_fn=die_with_parent,
    )


def prestart() -> None:
    """Start the server's interpreter now, unless one already waits (or there is no FUSE)."""
    if _early or not os.path.exists("/dev/fuse"):
        return
    log = tempfile.TemporaryFile()
    try:
        _early.append((spawn(None, log), log))
    except OSError:
        log.close()


def pending() -> int | None:
    """The pid of a prestarted server no enclave has taken yet."""
    return _early[-1][0].pid if _early else None


def take() -> tuple[subprocess.Popen[bytes], IO[bytes]] | None:
    """The waiting server and its log, if it is still alive; it is the caller's from now on."""
    while _early:
        process, log = _early.pop()
        if process.poll() is None:
            return process, log
        end(process)
        log.close()
    return None


def discard() -> None:
    """End a prestarted server that no enclave took (its stdin closed empty: it leaves at once)."""
    while _early:
        process, log = _early.pop()
        end(process)
        log.close()


def end(process: subprocess.Popen[bytes]) -> None:
    """End a server at once: it keeps no state (its mount, if any, is detached first by the caller)."""
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    if process.poll() is None:
        process.kill()
    process.wait()
