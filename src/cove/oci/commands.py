"""`cove-runtime`'s full command line: every option, `--help`, usage errors; `create` and `exec` from here.

cove.oci.cli answers the hot commands, and runs `create` with the usual
options, without this module (argparse alone is a few ms per engine call);
it comes here for `exec` and anything it does not recognise, so `--help`
and every usage error come from one parser. `create` is cove.oci.create,
`exec` cove.oci.execute.
"""

from __future__ import annotations

import argparse
import os
from typing import NoReturn

from cove import __version__
from cove.errors import CoveError, ExitCode
from cove.oci import cli
from cove.oci.cli import DEFAULT_ROOT, SPEC_VERSION


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, usage exit code
        raise CoveError(f"{message}", "see `cove-runtime --help`")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="cove-runtime", description="An OCI runtime for Cove enclaves (docs/containers.md).")
    top.add_argument("--root", default=DEFAULT_ROOT, help=f"where containers' state lives (default {DEFAULT_ROOT})")
    top.add_argument("--log", help="also write errors to this file")
    top.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="json: one object per line, as containerd's shim reads",
    )
    top.add_argument("--debug", action="store_true", help="tracebacks for unexpected errors")
    # engines pass it; the launcher makes the enclave's own cgroups
    top.add_argument("--systemd-cgroup", action="store_true", help=argparse.SUPPRESS)
    top.add_argument("--rootless", default=None, help=argparse.SUPPRESS)
    top.add_argument("--version", "-v", action="store_true")
    top.add_argument(
        "--node-root",
        help="the node service's --root, for /dev/attestation (default "
        "$COVE_NODE_ROOT or /var/lib/cove); podman: --runtime-flag node-root=DIR",
    )
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
    resident = sub.add_parser("resident", help="start the helper that does create's work (cove.oci.resident)")
    resident.add_argument("--socket", help="default $COVE_RUNTIME_RESIDENT or /run/cove-runtime-resident/sock")
    resident.add_argument("--foreground", action="store_true", help="serve in this process (for a service unit)")
    return top


# -- commands


def cmd_create(args: argparse.Namespace) -> int:
    from cove.oci import create

    return create.run(args.root, args.id, args.bundle, args.pid_file, args.console_socket, args.preserve_fds)


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
        if args.command == "resident":
            from cove.oci import resident

            return resident.run_resident(args.socket, args.foreground)
        if args.command == "exec":
            from cove.oci import execute

            return execute.run(
                args.root, args.id, args.process, args.console_socket, args.tty, args.detach, args.pid_file
            )
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
    except Exception as exc:  # the engine reads one line, never a traceback
        return cli.unexpected(options, exc)
