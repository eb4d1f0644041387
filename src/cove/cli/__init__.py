"""The `cove` command. Each command group lives in its own thin module.

click is imported only when a command needs it: `cove run` through the
daemon (cove.cli.attached) starts on the standard library alone, and not
all of that: pathlib and typing (about 9 ms of a start's CPU) are imported
only by the full CLI, never by this module or the fast paths.
"""

from __future__ import annotations

import errno
import os
import sys

from cove import __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy reads it as True
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    import click


class Context:
    """What every command may need: the instance folder and the debug flag."""

    def __init__(self, directory: Path, debug: bool):
        self.directory = directory
        self.debug = debug


# Which module of cove.cli defines each command. Modules are imported only
# when their command runs (or for --help), so `cove run` pays for nothing else.
COMMANDS = {
    "new": "instance",
    "add": "instance",
    "keygen": "instance",
    "build": "instance",
    "run": "run",
    "package": "package",
    "inspect": "package",
    "info": "info",
    "fs": "fs",
    "kbs": "kbs",
    "demo": "demo",
    "k8s": "k8s",
    "verify": "attest",
    "jwks": "attest",
    "platform": "platform",
    "daemon": "daemon",
    "ps": "lifecycle",
    "logs": "lifecycle",
    "stop": "lifecycle",
    "kill": "lifecycle",
    "rm": "lifecycle",
    "wait": "lifecycle",
    "images": "lifecycle",
    "rmi": "lifecycle",
    "events": "lifecycle",
    "exec": "lifecycle",
}


def _group() -> click.Group:
    """The click group (made on first use, so that click is imported only then)."""
    if "cli" not in _made:
        import importlib
        import pathlib

        import click

        class LazyGroup(click.Group):
            """A click group that imports a command's module on first use."""

            def list_commands(self, ctx: click.Context) -> list[str]:
                return sorted(COMMANDS)

            def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
                module = COMMANDS.get(name)
                if module is None:
                    return None
                for command in importlib.import_module(f"cove.cli.{module}").COMMANDS:
                    if command.name == name:
                        return command
                return None

        @click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
        @click.option(
            "-C",
            "directory",
            type=click.Path(file_okay=False, path_type=pathlib.Path),
            default=".",
            help="Act on the instance in DIR instead of the current folder. Unlike git -C it does not "
            "change directory: relative paths after it still resolve against the current folder.",
        )
        @click.option("--debug", is_flag=True, help="Show tracebacks for errors (docs/cli.md lists the exit codes).")
        @click.version_option(__version__, prog_name="cove")
        @click.pass_context
        def cli(ctx: click.Context, directory: Path, debug: bool) -> None:
            """Cove: run unmodified Linux programs in attested enclaves."""
            ctx.obj = Context(directory, debug)
            _options["debug"] = debug

        _made["cli"] = cli
    return _made["cli"]


_made: dict[str, click.Group] = {}


def __getattr__(name: str) -> Any:
    if name == "cli":  # `from cove.cli import cli`, as before click became lazy
        return _group()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_options = {"debug": False}  # set by the group callback, read by main() when an error escapes


def main(argv: list[str] | None = None) -> int:
    """Entry point: one clear line and a code from errors.ExitCode; tracebacks only with --debug."""
    args = sys.argv[1:] if argv is None else argv
    _options["debug"] = False
    import click

    from cove.errors import CoveError, ExitCode, file_system_error  # not on the fast paths: re and enum

    try:
        result = _group().main(args=args, prog_name="cove", standalone_mode=False)
    except CoveError as exc:
        return _fail(exc, exc.line(), exc.exit_code)
    except OSError as exc:  # a file the command reads or writes: read-only, full disk, I/O error
        error = file_system_error(exc)
        return _fail(exc, error.line(), error.exit_code)
    except click.exceptions.Abort:
        click.echo("cove: aborted", err=True)
        return ExitCode.INTERRUPTED
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.FileError as exc:  # a FILE argument click opens itself
        code = ExitCode.FILE_SYSTEM if os.path.exists(exc.ui_filename) else ExitCode.NOT_FOUND
        return _fail(exc, exc.format_message(), code)
    except click.ClickException as exc:
        cause = exc.__context__  # click.File reports an OSError as a bad parameter
        if isinstance(cause, OSError):
            code = ExitCode.NOT_FOUND if cause.errno == errno.ENOENT else ExitCode.FILE_SYSTEM
            return _fail(exc, exc.format_message(), code)
        return _fail(exc, _usage_line(exc), ExitCode.USAGE)
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    return result if isinstance(result, int) else 0


def _fail(exc: BaseException, line: str, code: int) -> int:
    import click

    if _options["debug"]:
        raise exc
    if line.startswith("cove: "):  # a verifier's line names the evidence type, here "cove"
        line = "Cove evidence: " + line[len("cove: ") :]
    click.echo(f"cove: error: {line}", err=True)
    return code


def _usage_line(exc: click.ClickException) -> str:
    """A click usage error as one line that says where help is."""
    import click

    line = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        line += f" (see `{ctx.command_path} --help`)"
    return line


def run_main() -> None:
    from cove.cli.attached import fast_ps, fast_run

    code = fast_run(sys.argv[1:])  # the plain `cove run` and `cove ps`, before click is imported
    if code is None:
        code = fast_ps(sys.argv[1:])
    sys.exit(main() if code is None else code)
