"""A pre-loaded process that forks supervisors (``python -m cove.daemon.spawner``), like a zygote.

Starting a supervisor as a new Python process costs the import of the
runtime every time; the daemon instead keeps this child, which imports it
once and forks a supervisor per request. Each supervisor is forked twice
(so it is nobody's child to wait for, as containerd's shims are), leads a
session of its own, and has the enclave's log as stdout and stderr. The
spawner reads one request per line on stdin (``FOLDER<TAB>STORE``) and ends
when the daemon closes it, or dies with it; supervisors go on either way.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cove.daemon.supervisor import Supervisor


def spawn(folder: str, store: str) -> None:
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)  # the middle process leaves at once
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        log = os.open(os.path.join(folder, "log"), os.O_WRONLY | os.O_APPEND)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.closerange(3, 65536)
        code = Supervisor(Path(folder), Path(store)).run()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code & 0xFF)
    except BaseException:  # noqa: BLE001 - a forked child must never return into the spawner's loop
        os._exit(125)


def main() -> int:
    for line in sys.stdin:
        folder, _, store = line.rstrip("\n").partition("\t")
        if folder and store:
            spawn(folder, store)
    return 0


if __name__ == "__main__":
    sys.exit(main())
