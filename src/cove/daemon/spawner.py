"""A pre-loaded process that forks supervisors (``python -m cove.daemon.spawner``), like a zygote.

Starting a supervisor as a new Python process costs the import of the
runtime every time; the daemon instead keeps this child, which imports it
once, does the first-use work supervisors would each repeat (backends,
services, libseccomp, pyelftools, one check of each stored image), and forks
a supervisor per request. Each supervisor is forked twice
(so it is nobody's child to wait for, as containerd's shims are), leads a
session of its own, and has the enclave's log as stdout and stderr. The
spawner reads one request per line on stdin (``FOLDER<TAB>STORE``) and ends
when the daemon closes it, or dies with it; supervisors go on either way.
One supervisor is always forked ahead and waits on a pipe for its enclave
(folder, store and the image's [resources], which it uses to prepare its
sandbox early: cove.runtime.sim.Prepared), so a start does not wait for the
forks; it leaves when that pipe ends empty.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from dataclasses import astuple
from pathlib import Path

from cove import trace
from cove.config import ResourcesSection
from cove.daemon.registry import read_record
from cove.daemon.supervisor import Supervisor
from cove.runtime import sim
from cove.errors import CoveError
from cove.image.store import ImageStore


_warmed: dict[str, ResourcesSection | None] = {}  # stored images this spawner has checked once: their limits


def warm_image(folder: str, store: str) -> ResourcesSection | None:
    """Check the enclave's stored image once here: the libraries' first-use work (key parsing, the
    listing's decoder) is then done for every later fork. The supervisor checks it again itself.
    Its [resources], for the supervisor to prepare the sandbox's cgroups early (cove.runtime.sim.Prepared:
    a hint only, used when the supervisor's own verification finds the same)."""
    try:
        ident = read_record(Path(folder)).get("image")
    except (OSError, ValueError):
        return None  # the supervisor reads it again and reports what is wrong
    if not isinstance(ident, str):
        return None
    if ident in _warmed:
        return _warmed[ident]
    _warmed[ident] = None
    try:
        images = ImageStore(Path(store))
        _warmed[ident] = images.verified(images.get(ident)).config.resources
    except Exception:  # noqa: BLE001 - a warm-up of verification, not decoding: the supervisor verifies again
        return None
    gc.freeze()
    return _warmed[ident]


def spawn(folder: str, store: str, ready: int | None = None) -> int | None:
    """Hand the enclave to the supervisor forked ahead (``ready``: its order pipe), or to one forked now
    if that one is gone; then fork the next one, with this image's checks warm in it. Its order pipe."""
    asked = time.perf_counter()
    resources = warm_image(folder, store)
    order = json.dumps(
        {"folder": folder, "store": store, "asked": asked, "resources": resources and list(astuple(resources))}
    ).encode()
    try:
        if ready is None or not _send(ready, order):
            _send(_fork_supervisor(resources), order)
        return _fork_supervisor(resources)
    except OSError:  # no process could be forked: the daemon's wait for the state times out and says so
        return None


def _send(pipe: int, order: bytes) -> bool:
    try:
        os.write(pipe, order)  # a few hundred bytes: one write, below a pipe's buffer
        return True
    except OSError:  # it died (the pipe's reader is gone)
        return False
    finally:
        os.close(pipe)


def _fork_supervisor(resources: ResourcesSection | None = None) -> int:
    """A supervisor forked now, before its enclave is known: twice (nobody's child to wait for, as
    containerd's shims are), in a session of its own, waiting on a pipe whose write end it returns.
    Meanwhile it prepares a sim sandbox with the last image's limits (the defaults at first): its
    first process joins new cgroups while nothing waits for it (used if the enclave asks the same).
    It leaves if the pipe ends empty (the spawner ended: the daemon stopped)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid:
        os.close(read)
        os.waitpid(pid, 0)  # the middle process leaves at once
        return write
    try:
        os.close(write)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # not the daemon's request lines
        os.setsid()
        if os.fork():
            os._exit(0)
        os.closerange(3, read)  # nothing of the spawner's but the standard descriptors and the order's pipe
        os.closerange(read + 1, 65536)
        try:
            sim.prepare(resources or ResourcesSection())
        except (CoveError, OSError):
            pass  # the supervisor prepares again, or starts the sandbox as without this
        chunks = []
        while chunk := os.read(read, 1 << 16):
            chunks.append(chunk)
        if not chunks:
            sim.discard_prepared()
            os._exit(0)
        order = json.loads(b"".join(chunks))
        folder, store = str(order["folder"]), str(order["store"])
        resources = ResourcesSection(*order["resources"]) if order.get("resources") else None
        os.close(read)
        log = os.open(os.path.join(folder, "log"), os.O_WRONLY | os.O_APPEND)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        trace.emit("spawner.fork", float(order["asked"]), time.perf_counter())
        with trace.span("supervisor.run"):
            with trace.span("supervisor.init"):
                supervisor = Supervisor(Path(folder), Path(store), resources)
            code = supervisor.run()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code & 0xFF)
    except BaseException:  # noqa: BLE001 - a forked child must never return into the spawner's loop
        os._exit(125)


def warm() -> None:
    """Do once, here, what every supervisor would otherwise do first: import the backends and the
    services' modules, load libseccomp, so each fork starts with them."""
    import importlib

    from cove.image import elf
    from cove.runtime import backend, enclave_services, seccomp

    with trace.span("spawner.warm"):
        for spec in enclave_services.FACTORIES:
            importlib.import_module(spec.partition(":")[0])
        backend.registry()
        try:
            backend.choose("sim")
            seccomp.compile_filter("none")
            elf.read_elf(os.path.realpath(sys.executable))  # pyelftools builds its parsers on first use
        except (CoveError, OSError):
            pass  # a supervisor reports it for its own enclave


def main() -> int:
    warm()
    # what is loaded now is shared with every fork: keep the collector off it, so a supervisor's
    # collections do not touch (and so copy) those pages
    gc.freeze()
    ready: int | None = _fork_supervisor()  # the next supervisor waits, forked: a start does not wait for its fork
    for line in sys.stdin:
        folder, _, store = line.rstrip("\n").partition("\t")
        if folder and store:
            ready = spawn(folder, store, ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
