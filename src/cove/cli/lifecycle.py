"""cove ps, logs, stop, kill, rm, wait, images, rmi, events: the daemon's enclaves, Docker-like.

These talk to `cove daemon` through cove.daemon.client (standard library
only) and import nothing else of Cove, so they start fast. `cove run -d` and
`cove inspect ID` come here too (start_detached, inspect_enclave).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from cove.cli import listing
from cove.daemon.client import Client, DaemonError, NotRunning
from cove.errors import CoveError


class LifecycleError(CoveError):
    """A daemon's answer or absence, with the exit code the daemon gave (docs/cli.md)."""

    def __init__(self, line: str, code: int):
        super().__init__(line)
        self.exit_code = code


def _call(
    method: str,
    route: str,
    body: dict[str, Any] | None = None,
    query: dict[str, Any] | None = None,
    timeout: float | None = 60.0,
) -> Any:
    try:
        return Client().call(method, route, body, query, timeout)
    except NotRunning as exc:
        raise LifecycleError(
            f"{exc.line} (start it with `sudo cove daemon` or `systemctl start cove`)", exc.exit_code
        ) from None
    except DaemonError as exc:
        raise LifecycleError(exc.line, exc.exit_code) from None


@click.command()
@click.option("-a", "--all", "all_", is_flag=True, help="Show ended enclaves too.")
@click.option("-q", "--quiet", is_flag=True, help="Only ids.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
def ps(all_: bool, quiet: bool, as_json: bool) -> None:
    """List enclaves: id, name, measurement prefix, backend, state, uptime, exit code."""
    views = _call("GET", "/enclaves", query={"all": "1" if all_ else "0"})
    for line in listing.ps_lines(views, quiet, as_json):
        click.echo(line)


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing output until the enclave ends.")
@click.option("--tail", type=click.IntRange(min=0), help="Only the last N lines.")
@click.argument("ref")
def logs(follow: bool, tail: int | None, ref: str) -> None:
    """Print an enclave's output (stdout and stderr, as the program wrote them)."""
    _copy_log(ref, follow, tail)


def _copy_log(ref: str, follow: bool, tail: int | None = None) -> None:
    query = {"follow": "1" if follow else "0", "tail": tail}
    out = sys.stdout.buffer
    try:
        for chunk in Client().stream(f"/enclaves/{ref}/logs", query):
            out.write(chunk)
            out.flush()
    except NotRunning as exc:
        raise LifecycleError(exc.line, exc.exit_code) from None
    except DaemonError as exc:
        raise LifecycleError(exc.line, exc.exit_code) from None


@click.command()
@click.option(
    "-t",
    "--time",
    "timeout",
    type=click.FloatRange(min=0, max=1e6),
    default=10.0,
    show_default=True,
    help="Seconds between SIGTERM and SIGKILL.",
)
@click.argument("refs", nargs=-1, required=True)
def stop(timeout: float, refs: tuple[str, ...]) -> None:
    """Stop enclaves: SIGTERM to the program, SIGKILL after -t seconds; no restart follows."""
    for ref in refs:
        _call("POST", f"/enclaves/{ref}/stop", query={"timeout": timeout}, timeout=timeout + 60)
        click.echo(ref)


@click.command()
@click.option(
    "-s", "--signal", "signame", default="KILL", show_default=True, help="Signal name (TERM, SIGHUP) or number."
)
@click.argument("refs", nargs=-1, required=True)
def kill(signame: str, refs: tuple[str, ...]) -> None:
    """Send a signal to enclaves' programs."""
    for ref in refs:
        _call("POST", f"/enclaves/{ref}/kill", query={"signal": signame})
        click.echo(ref)


@click.command()
@click.option("-f", "--force", is_flag=True, help="Stop a running enclave first (SIGKILL).")
@click.argument("refs", nargs=-1, required=True)
def rm(force: bool, refs: tuple[str, ...]) -> None:
    """Remove ended enclaves (their state folder and log)."""
    for ref in refs:
        _call("DELETE", f"/enclaves/{ref}", query={"force": "1" if force else "0"}, timeout=120)
        click.echo(ref)


@click.command()
@click.argument("refs", nargs=-1, required=True)
def wait(refs: tuple[str, ...]) -> int:
    """Wait for enclaves to end; print each exit code; exit with the last one's."""
    code = 0
    for ref in refs:
        view = _call("POST", f"/enclaves/{ref}/wait", timeout=None)
        code = view["exit_code"] if view.get("exit_code") is not None else 0
        click.echo(code)
    return 0


@click.command()
@click.option("-q", "--quiet", is_flag=True, help="Only ids.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
def images(quiet: bool, as_json: bool) -> None:
    """List the images in the node's store."""
    found = _call("GET", "/images")
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if quiet:
        for image in found:
            click.echo(image["id"][:12])
        return
    rows = [("IMAGE ID", "NAME", "SIGNER", "FILES", "SIZE", "ENCLAVES")]
    for image in found:
        rows.append(
            (
                image["id"][:12],
                image["name"],
                image["signer"][:12],
                str(image["files"]),
                f"{image['bytes'] / 1e6:.1f} MB",
                str(image["enclaves"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


@click.command()
@click.option("-f", "--force", is_flag=True, help="Even if ended enclaves still name it.")
@click.argument("ids", nargs=-1, required=True)
def rmi(force: bool, ids: tuple[str, ...]) -> None:
    """Remove images from the store and collect content no image uses."""
    for ident in ids:
        result = _call("DELETE", f"/images/{ident}", query={"force": "1" if force else "0"}, timeout=600)
        click.echo(f"removed {result['id'][:12]} ({result['bytes_freed'] / 1e6:.1f} MB freed)")


@click.command()
@click.option("--since", type=click.IntRange(min=0), default=0, help="Only events after this sequence number.")
@click.option("--no-follow", is_flag=True, help="Print past events and return.")
def events(since: int, no_follow: bool) -> None:
    """Stream lifecycle events (create, start, die, stop, kill, remove, image import) as JSON lines."""
    out = sys.stdout.buffer
    try:
        for chunk in Client().stream("/events", {"since": since, "follow": "0" if no_follow else "1"}):
            if chunk.strip():
                out.write(chunk)
                out.flush()
    except DaemonError as exc:
        raise LifecycleError(exc.line, exc.exit_code) from None


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="Send this command's stdin to the program.")
@click.option("-t", "--tty", is_flag=True, help="Give the program a terminal of the enclave's (raw mode here).")
@click.argument("ref")
@click.argument("program")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def exec_(interactive: bool, tty: bool, ref: str, program: str, args: tuple[str, ...]) -> int:
    """Run PROGRAM in a running enclave: its namespaces, seccomp filter, limits, user and environment."""
    return _exec_stream(ref, [program, *args], interactive, tty)


def _terminal_size() -> tuple[int, int]:
    for fd in (1, 0, 2):
        try:
            size = os.get_terminal_size(fd)
            return size.lines, size.columns
        except OSError:
            continue
    return 24, 80


def _exec_stream(ref: str, argv: list[str], interactive: bool, tty: bool) -> int:
    """`cove exec` over the upgraded connection (docs/formats/daemon-api.md): output as it comes, the exit code."""
    import queue
    import signal
    import termios

    import threading
    import tty as tty_mod

    from cove.daemon import execstream

    rows, cols = _terminal_size() if tty else (24, 80)
    body = {"argv": argv, "stdin": interactive, "tty": tty, "rows": rows, "cols": cols}
    try:
        response = Client().upgrade(f"/enclaves/{ref}/exec", body, execstream.PROTOCOL)
    except DaemonError as exc:
        raise LifecycleError(exc.line, exc.exit_code) from None
    sock, reader = response.sock, response.file
    # one writer thread sends every frame: the SIGWINCH handler, on the main (reading) thread, only queues
    # (SimpleQueue.put is safe in a signal handler), so output keeps being read while a send is blocked
    outbox: queue.SimpleQueue[tuple[bytes, bool] | None] = queue.SimpleQueue()
    room = threading.Semaphore(8)  # stdin frames queued at most: a daemon that does not read stops stdin only

    def write_frames() -> None:
        while (item := outbox.get()) is not None:
            data, counted = item
            try:
                sock.sendall(data)
            except OSError:
                pass  # the daemon left: reading the stream says how
            if counted:
                room.release()

    def copy_stdin() -> None:
        try:
            while data := os.read(0, execstream.CHUNK):
                room.acquire()
                outbox.put((execstream.frame(execstream.STDIN, data), True))
            room.acquire()
            outbox.put((execstream.frame(execstream.STDIN), True))
        except OSError:
            pass

    saved = None
    previous_winch = None
    if tty and os.isatty(0):
        saved = termios.tcgetattr(0)
        tty_mod.setraw(0, termios.TCSANOW)
    if tty:

        def resize(_signum: int, _frame: object) -> None:
            outbox.put((execstream.resize_frame(*_terminal_size()), False))

        previous_winch = signal.signal(signal.SIGWINCH, resize)
    threading.Thread(target=write_frames, name="frames", daemon=True).start()
    try:
        if interactive:
            threading.Thread(target=copy_stdin, name="stdin", daemon=True).start()
        while True:
            try:
                item = execstream.read_frame(reader)
            except (execstream.ProtocolError, OSError):
                item = None
            if item is None:
                raise LifecycleError("the connection to the daemon ended before the program did", 7)
            kind, payload = item
            if kind == execstream.EXIT:
                return execstream.parse_exit(payload)
            _write_all(2 if kind == execstream.STDERR else 1, payload)
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        if previous_winch is not None:
            signal.signal(signal.SIGWINCH, previous_winch)
        outbox.put(None)
        response.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


exec_.name = "exec"


def inspect_enclave(ref: str) -> None:
    click.echo(json.dumps(_call("GET", f"/enclaves/{ref}"), indent=2))


def start_detached(
    instance: Path,
    program: str,
    args: tuple[str, ...],
    name: str | None,
    backend: str | None,
    restart: str,
    signer: str | None,
) -> int:
    """`cove run -d`: start through the daemon, print the id."""
    from cove.cli import attached

    view = _call(
        "POST", "/enclaves", attached.create_body(instance, program, args, name, backend, restart, signer), timeout=3600
    )
    click.echo(view["id"])
    return 0


def daemon_available() -> bool:
    """Whether `cove run` should go through the daemon: cove.cli.attached decides (one decision for both paths)."""
    from cove.cli import attached

    return attached.daemon_available()


def run_attached(
    instance: Path, program: str, args: tuple[str, ...], backend: str | None, signer: str | None
) -> int | None:
    """`cove run` through the daemon (cove.cli.attached, which the common case reaches without click); None
    when the daemon refuses the instance for naming host paths: the caller runs it directly."""
    from cove.cli import attached

    try:
        return attached.run_attached(instance, program, args, backend, signer)
    except DaemonError as exc:
        if exc.kind == attached.HOST_PATHS:
            return None
        raise LifecycleError(exc.line, exc.exit_code) from None


COMMANDS = (ps, logs, stop, kill, rm, wait, images, rmi, events, exec_)
