"""`cove-runtime create`: verify the bundle, copy the signed tree, leave the container's process waiting.

Reads config.json, verifies the root file system against the signed build
under /.cove/ and copies the signed tree into a private root, all before
anything runs (cove.oci.launch.prepare); it leaves one process behind (the
container's pid, as runc's init), which waits for `start` on a FIFO and
then launches the enclave through Cove's launcher (services such as
/dev/attestation and [[secrets]] included) and exits with the program's
code. cove.oci.cli calls it directly (no argparse) when the options are the
usual ones; this module loads only the standard library and cove.oci's
light modules until the bundle is read, then the verifier (shared with the
container's process, which is forked right after).
"""

from __future__ import annotations

import fcntl
import os
import pickle
import sys
import termios
import time
from pathlib import Path

from cove.errors import CoveError
from cove.oci import cgroups, cli
from cove.oci import spec as spec_mod
from cove.oci.cli import FIFO, Container


def run(
    root: str,
    ident: str,
    bundle_dir: str,
    pid_file: str | None,
    console_socket: str | None,
    preserve_fds: int = 0,
    close_in_child: tuple[int, ...] = (),
) -> int:
    """Verify and copy the bundle, fork the container's process (waiting for `start`), record the state.

    The verifier's modules (cove.oci.launch: the manifest, signature and
    configuration readers, cryptography) are loaded once, here, before the
    fork: the launcher needs them too, so the container's process inherits
    them instead of loading them a second time beside this one (about 30 ms
    of CPU per container on this machine kind, where the engine shares the
    two cores: docs/performance.md). After the fork the container's process loads only the
    launcher's own modules while this process checks the image, then it
    receives the verified build from here over a private pipe (pickled; only
    these two processes hold the pipe), so by the time the engine calls
    `start` it has nothing left to do but launch. A refused image closes the
    pipe empty: the container's process ends without a word, and this
    process reports the refusal and removes everything. close_in_child:
    descriptors the container's process must not keep (the resident
    helper's connection, cove.oci.resident). The garbage
    collector stays off while modules load (a short-lived process of
    imports; the container's process turns it back on once warm).
    """
    import gc

    gc.disable()
    from cove import trace

    laps = trace.Laps("oci.create.")  # COVE_TRACE_START: where create's milliseconds go (docs/performance.md)
    container = Container(root, ident)
    bundle = spec_mod.load(Path(bundle_dir))
    Path(root).mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.mkdir(container.dir, 0o700)
    except FileExistsError:
        raise CoveError(f"container {ident} already exists", "delete it first, or choose another id") from None
    pid: int | None = None
    groups: list[str] = []
    made: list[str] = []  # only these are the container's: kill --all and delete never touch a group that existed
    handing: int | None = None
    try:
        if bundle.cgroups_path:
            groups = cgroups.groups_for(bundle.cgroups_path)
            made = cgroups.make(groups, bundle.memory_limit, bundle.pids_limit)
        console: int | None = None
        if bundle.process.terminal:
            if not console_socket:
                raise spec_mod.BundleError("config.json: process.terminal is true but no --console-socket was given")
            console = _open_console(console_socket)
        os.mkfifo(container.path(FIFO), 0o600)
        laps.lap("bundle")
        from cove.oci import launch  # before the fork: both processes need it (above)

        laps.lap("import")
        receiving, handing = os.pipe()
        pid = _fork(Path(container.path(FIFO)), console, preserve_fds, groups, receiving, handing, close_in_child)
        laps.lap("fork")
        prepared = launch.prepare(bundle, Path(container.dir))
        laps.lap("verify")
        with os.fdopen(handing, "wb") as pipe:
            handing = None
            pipe.write(pickle.dumps(prepared))
        found = cli.start_time(pid)
        container.save(
            {
                "id": ident,
                "pid": pid,
                "pid_start": found[0] if found else None,
                "cgroups": groups or cgroups.own(),
                "container_cgroups": made,
                "engine_cgroups": groups,  # from cgroupsPath: the resident path's stub joins them (cove.oci.resident)
                "bundle": str(Path(bundle_dir).resolve()),
                "created": time.time(),
                "annotations": bundle.annotations,
                "unmeasured": prepared.unmeasured,
            }
        )
        if pid_file:
            tmp = Path(pid_file).with_name(f".{Path(pid_file).name}.tmp")
            tmp.write_text(str(pid))
            os.replace(tmp, pid_file)
        laps.lap("hand-over")
    except BaseException:
        if handing is not None:
            os.close(handing)  # the container's process reads nothing and ends
        if pid is not None:  # e.g. an unwritable --pid-file: the waiting process must not outlive the refusal
            found = cli.start_time(pid)
            cli.kill_and_wait(pid, found[0] if found else None)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        try:
            cli.cleanup(container.dir)
        except CoveError:
            pass  # something stays mounted below: the folder stays too, and the refusal in hand is the one to give
        cli.remove_groups(made)
        raise
    return 0


def _fork(
    fifo: Path,
    console: int | None,
    preserve_fds: int,
    groups: list[str],
    receiving: int,
    handing: int,
    close_in_child: tuple[int, ...] = (),
) -> int:
    """Fork the container's process: it warms up, takes the verified build, waits on fifo for `start`. Its pid.

    The fifo is open for reading before the fork, so a `start` that comes at
    once finds its reader (runc's exec fifo, the other way round). After
    `start` the process joins the container's cgroup (groups) and launches
    the enclave (cove.oci.launch.run), and exits with the program's code.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    waiting = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    pid = os.fork()
    if pid:
        os.close(waiting)
        os.close(receiving)
        if console is not None:
            os.close(console)
        return pid
    code = 125
    try:
        os.close(handing)
        for fd in close_in_child:
            os.close(fd)
        os.setsid()
        if console is not None:
            fcntl.ioctl(console, termios.TIOCSCTTY, 0)
            for fd in (0, 1, 2):
                os.dup2(console, fd)
            os.close(console)
        for fd in range(3, 3 + preserve_fds):
            try:
                os.set_inheritable(fd, True)
            except OSError:
                pass
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # never end of file while waiting
        os.set_blocking(waiting, True)
        import gc

        from cove import trace
        from cove.oci import launch  # loaded by create before the fork

        laps = trace.Laps("oci.container.")
        launch.warm()
        gc.freeze()  # what is loaded stays: the collector need not walk it again while the enclave runs
        gc.enable()
        laps.lap("warm")
        with os.fdopen(receiving, "rb") as pipe:
            data = pipe.read()
        laps.lap("wait-for-verification")
        if not data:
            os._exit(0)  # create refused the image and says why
        prepared = pickle.loads(data)  # from the parent that verified it, over a pipe only the two hold
        from cove.oci import execute

        execute.save_settings(prepared, fifo.parent)  # for `exec`
        laps.lap("exec-settings")
        go = os.read(waiting, 1)  # blocks until `start` writes
        laps.lap("wait-for-start")
        os.close(writer)
        os.close(waiting)
        if go != b"1":
            os._exit(125)
        if groups:
            cgroups.join(groups)  # the engine's cgroup: from here on, the enclave's launch and program
        code = launch.run(prepared)
    except CoveError as exc:
        print(f"cove-runtime: error: {exc.line()}", file=sys.stderr, flush=True)
        code = int(exc.exit_code)
    except BaseException as exc:  # never a traceback on the container's stderr
        print(f"cove-runtime: error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)


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
