"""`cove-runtime`'s heavy commands: `create` (verify, copy, fork the container's process) and `exec`.

cove.oci.cli answers the hot commands itself and comes here for these and
for anything it does not recognise: this module has the full command line
(so `--help` and every usage error come from one parser). `create` reads
config.json, verifies the root file system against the signed build under
/.cove/ and copies the signed tree into a private root, all before anything
runs; then it leaves one process behind (the container's pid, as runc's
init), which waits for `start` on a FIFO and then launches the enclave
through Cove's launcher (services such as /dev/attestation and [[secrets]]
included) and exits with the program's code.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from pathlib import Path
from typing import NoReturn

from cove import __version__
from cove.errors import CoveError, ExitCode
from cove.oci import cli
from cove.oci import spec as spec_mod
from cove.oci.cli import DEFAULT_ROOT, FIFO, SPEC_VERSION, Container

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, usage exit code
        raise CoveError(f"{message}", "see `cove-runtime --help`")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="cove-runtime", description="An OCI runtime for Cove enclaves (docs/containers.md).")
    top.add_argument("--root", default=DEFAULT_ROOT, help=f"where containers' state lives (default {DEFAULT_ROOT})")
    top.add_argument("--log", help="also write errors to this file")
    top.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="json: one object per line, as containerd's shim reads")
    top.add_argument("--debug", action="store_true", help="tracebacks for unexpected errors")
    # engines pass it; the launcher makes the enclave's own cgroups
    top.add_argument("--systemd-cgroup", action="store_true", help=argparse.SUPPRESS)
    top.add_argument("--rootless", default=None, help=argparse.SUPPRESS)
    top.add_argument("--version", "-v", action="store_true")
    top.add_argument("--node-root", help="the node service's --root, for /dev/attestation (default "
                                         "$COVE_NODE_ROOT or /var/lib/cove); podman: --runtime-flag node-root=DIR")
    sub = top.add_subparsers(dest="command", parser_class=_Parser)
    create = sub.add_parser("create")
    create.add_argument("--bundle", "-b", default=".")
    create.add_argument("--pid-file")
    create.add_argument("--console-socket")
    create.add_argument("--no-pivot", action="store_true")
    create.add_argument("--no-new-keyring", action="store_true")
    create.add_argument("--preserve-fds", type=int, default=0)
    create.add_argument("id")
    exec_ = sub.add_parser("exec")
    exec_.add_argument("--process", "-p", required=True, help="the process.json engines write")
    exec_.add_argument("--console-socket")
    exec_.add_argument("--tty", "-t", action="store_true")
    exec_.add_argument("--detach", "-d", action="store_true")
    exec_.add_argument("--pid-file")
    exec_.add_argument("--preserve-fds", type=int, default=0, help=argparse.SUPPRESS)
    exec_.add_argument("--no-new-privs", action="store_true", help=argparse.SUPPRESS)  # always set
    exec_.add_argument("--ignore-paused", action="store_true", help=argparse.SUPPRESS)
    exec_.add_argument("id")
    for name in ("start", "state"):
        sub.add_parser(name).add_argument("id")
    kill = sub.add_parser("kill")
    kill.add_argument("--all", "-a", action="store_true")
    kill.add_argument("id")
    kill.add_argument("signal", nargs="?", default="SIGTERM")
    delete = sub.add_parser("delete")
    delete.add_argument("--force", "-f", action="store_true")
    delete.add_argument("id")
    sub.add_parser("features")
    return top


# -- commands

def cmd_create(args: argparse.Namespace) -> int:
    from cove import trace

    laps = trace.Laps("oci.create.")  # COVE_TRACE_START: where create's milliseconds go (docs/performance.md)
    from cove.oci import cgroups, launch

    laps.lap("import")
    container = Container(args.root, args.id)
    bundle = spec_mod.load(Path(args.bundle))
    Path(args.root).mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.mkdir(container.dir, 0o700)
    except FileExistsError:
        raise CoveError(f"container {args.id} already exists", "delete it first, or choose another id") from None
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
            if not args.console_socket:
                raise spec_mod.BundleError("config.json: process.terminal is true but no --console-socket was given")
            console = _open_console(args.console_socket)
        os.mkfifo(container.path(FIFO), 0o600)
        pid = launch.spawn(prepared, Path(container.path(FIFO)), console, args.preserve_fds, groups)
        found = cli.start_time(pid)
        container.save({"id": args.id, "pid": pid, "pid_start": found[0] if found else None, "cgroups": groups or cli.own_cgroups(), "container_cgroups": groups,
                        "bundle": str(Path(args.bundle).resolve()), "created": time.time(),
                        "annotations": bundle.annotations, "unmeasured": prepared.unmeasured})
        if args.pid_file:
            tmp = Path(args.pid_file).with_name(f".{Path(args.pid_file).name}.tmp")
            tmp.write_text(str(pid))
            os.replace(tmp, args.pid_file)
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


def _hot(args: argparse.Namespace) -> int:
    """A hot command that reached the full parser (e.g. options in another order): cove.oci.cli runs it."""
    if args.command == "start":
        return cli.cmd_start(args.root, args.id)
    if args.command == "state":
        return cli.cmd_state(args.root, args.id)
    if args.command == "kill":
        return cli.cmd_kill(args.root, args.id, args.signal, args.all)
    if args.command == "delete":
        return cli.cmd_delete(args.root, args.id, args.force)
    return cli.cmd_features()


def main(argv: list[str] | None = None) -> int:
    args = argparse.Namespace(log=None, log_format="text", debug=False)
    options = cli.Options()
    try:
        args = parser().parse_args(argv)
        options.log, options.log_format, options.debug = args.log, args.log_format, args.debug
        if args.version:
            print(f"cove-runtime version {__version__}\nspec: {SPEC_VERSION}")
            return 0
        if args.node_root:
            os.environ["COVE_NODE_ROOT"] = args.node_root  # read by cove.oci.launch in the container's process
        if not args.command:
            raise CoveError("a command is needed", "create, exec, start, state, kill, delete or features")
        if args.command == "create":
            return cmd_create(args)
        if args.command == "exec":
            from cove.oci import execute

            return execute.run(args.root, args.id, args.process, args.console_socket, args.tty, args.detach,
                               args.pid_file)
        return _hot(args)
    except CoveError as exc:
        return cli.report(options, exc)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)
    except OSError as exc:
        from cove.errors import file_system_error

        code = cli.report(options, file_system_error(exc))
        if options.debug:
            raise
        return code
