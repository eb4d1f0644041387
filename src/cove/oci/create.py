"""`cove-runtime create`: verify the bundle, copy the signed tree, leave the container's process waiting.

Reads config.json, verifies the root file system against the signed build
under /.cove/ and copies the signed tree into a private root, all before
anything runs; then it leaves one process behind (the container's pid, as
runc's init), which waits for `start` on a FIFO and then launches the
enclave through Cove's launcher (services such as /dev/attestation and
[[secrets]] included) and exits with the program's code. cove.oci.cli
calls it directly (no argparse) when the options are the usual ones.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from cove.errors import CoveError
from cove.oci import cli
from cove.oci import spec as spec_mod
from cove.oci.cli import FIFO, Container


def run(root: str, ident: str, bundle_dir: str, pid_file: str | None, console_socket: str | None,
        preserve_fds: int = 0) -> int:
    """Verify and copy the bundle, fork the container's process (waiting for `start`), record the state."""
    from cove import trace

    laps = trace.Laps("oci.create.")  # COVE_TRACE_START: where create's milliseconds go (docs/performance.md)
    from cove.oci import cgroups, launch

    laps.lap("import")
    container = Container(root, ident)
    bundle = spec_mod.load(Path(bundle_dir))
    Path(root).mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.mkdir(container.dir, 0o700)
    except FileExistsError:
        raise CoveError(f"container {ident} already exists", "delete it first, or choose another id") from None
    pid: int | None = None
    groups: list[str] = []
    try:
        if bundle.cgroups_path:
            groups = cgroups.groups_for(bundle.cgroups_path)
            cgroups.make(groups, bundle.memory_limit, bundle.pids_limit)
        laps.lap("bundle")
        prepared = launch.prepare(bundle, Path(container.dir))
        laps.lap("verify")
        console: int | None = None
        if bundle.process.terminal:
            if not console_socket:
                raise spec_mod.BundleError("config.json: process.terminal is true but no --console-socket was given")
            console = _open_console(console_socket)
        os.mkfifo(container.path(FIFO), 0o600)
        pid = launch.spawn(prepared, Path(container.path(FIFO)), console, preserve_fds, groups)
        found = cli.start_time(pid)
        container.save({"id": ident, "pid": pid, "pid_start": found[0] if found else None,
                        "cgroups": groups or cli.own_cgroups(), "container_cgroups": groups,
                        "bundle": str(Path(bundle_dir).resolve()), "created": time.time(),
                        "annotations": bundle.annotations, "unmeasured": prepared.unmeasured})
        if pid_file:
            tmp = Path(pid_file).with_name(f".{Path(pid_file).name}.tmp")
            tmp.write_text(str(pid))
            os.replace(tmp, pid_file)
        laps.lap("spawn")
    except BaseException:
        if pid is not None:  # e.g. an unwritable --pid-file: the waiting process must not outlive the refusal
            found = cli.start_time(pid)
            cli.kill_and_wait(pid, found[0] if found else None)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        cli.cleanup(container.dir)
        cgroups.remove(groups)
        raise
    return 0


def _open_console(path: str) -> int:
    """A new pseudo-terminal: its master goes to the engine over the console socket, its slave is returned."""
    import array
    import pty
    import socket

    master, slave = pty.openpty()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            fds = array.array("i", [master])
            sock.sendmsg([b"/dev/ptmx"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    except OSError as exc:
        os.close(slave)
        raise CoveError(f"--console-socket {path}: {exc.strerror or exc}") from None
    finally:
        os.close(master)
    return slave
