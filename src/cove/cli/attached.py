"""`cove run` without click: the plain form through the daemon (standard library only) or directly.

`cove [-C DIR] run PROGRAM ARGS...` is the command run most often. When a
daemon answers, its client needs neither click nor the runtime, which cost
more to import than the enclave takes to run; without a daemon the runtime
is needed, click still is not. :func:`fast_run` handles that exact form
before click is imported and returns None for anything else (options, an
encrypted instance the daemon would not run, a cove.toml to report),
which the full CLI then runs with the same result. :func:`run_attached` is
what both paths run through the daemon; cove.cli.direct what both run
directly.
"""

from __future__ import annotations

import gc
import os
import sys

from cove.daemon.client import (
    ENDED,
    OUTPUT,
    STARTED,
    UNREACHABLE,
    Client,
    DaemonError,
    NotRunning,
    from_json,
    read_frame,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cove.cli says why); mypy reads it as True
if TYPE_CHECKING:
    from types import FrameType
    from typing import Any

    Folder = str | os.PathLike[str]  # an instance folder: a plain str here, a pathlib.Path from the full CLI
    import signal as _signal  # the same functions and numbers, as typeshed describes them
else:
    import _signal  # what signal.py wraps: that module imports enum (so does json, through re; socket too)

# Through the daemon this module imports neither cove.errors (re, enum) nor cove.trace (contextlib, hence
# collections and functools): together more of a start's CPU than its two requests. Both are imported
# where they are needed: the direct path, a failure, COVE_TRACE_START set.
ENCRYPTED_IMAGE = "image.enc"  # cove.image.encryption.ENCRYPTED_IMAGE: such a build runs directly
FORWARDED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)
TRACE_ENV = "COVE_TRACE_START"  # cove.trace.ENV


class _Untraced:
    """cove.trace.span's block when tracing is off, without importing cove.trace."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# the daemon's refusal of a member's instance that names host paths (it would open them as root):
# `cove run` runs such an instance directly, as the user, with the same output and exit codes
HOST_PATHS = "HostPaths"


def _span(name: str) -> Any:
    """cove.trace.span(name) when COVE_TRACE_START is set, else a block that does nothing."""
    if not os.environ.get(TRACE_ENV):
        return _Untraced()
    from cove import trace

    return trace.span(name)


def _exit_code(name: str) -> int:
    """cove.errors.ExitCode[name], imported only when a run ends that way."""
    from cove.errors import ExitCode

    return int(ExitCode[name])


HINT = " (start it with `sudo cove daemon` or `systemctl start cove`)"


def create_body(
    instance: Folder,
    program: str,
    args: tuple[str, ...],
    name: str | None,
    backend: str | None,
    restart: str,
    signer: str | None,
) -> dict[str, Any]:
    """The POST /enclaves request of `cove run` and `cove run -d`."""
    return {
        "instance": os.path.realpath(instance),  # what Path.resolve() gives, without importing pathlib
        "program": program,
        "args": list(args),
        "name": name,
        "backend": backend,
        "restart": restart,
        "signer": signer,
        "env": dict(os.environ),
    }


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
        raise NotRunning(exc.line + HINT, exc.exit_code, exc.status, exc.kind) from None


def _quiet_call(method: str, route: str, query: dict[str, Any] | None = None) -> None:
    try:
        Client().call(method, route, None, query)
    except DaemonError:
        pass


def _forward_signals(ident: str) -> dict[int, Any]:
    """Forward Ctrl-C and SIGTERM to the enclave (POST .../kill from a thread); the handlers replaced."""

    def forward(signum: int, _frame: FrameType | None) -> None:
        import threading  # only once a signal comes: most runs never need it

        threading.Thread(
            target=_quiet_call, args=("POST", f"/enclaves/{ident}/kill", {"signal": str(signum)}), daemon=True
        ).start()

    return {signum: _signal.signal(signum, forward) for signum in FORWARDED}


def _restore(previous: dict[int, Any]) -> None:
    for number, handler in previous.items():
        _signal.signal(number, handler)


def _outcome(view: dict[str, Any]) -> int:
    """The exit code of an ended enclave's view, or DaemonError with its error line."""
    code = view.get("exit_code")
    if not isinstance(code, int) or isinstance(code, bool):
        code = 0 if code is None and not view.get("error") else _exit_code("SANDBOX")
    if view.get("error"):
        raise DaemonError(" ".join(str(view["error"]).split()), code)  # one line, whatever the daemon sent
    return code


def follow(ident: str) -> int:
    """Copy the started enclave's output, forward Ctrl-C and SIGTERM, remove it at the end; its exit code.

    What a daemon without the attach upgrade gets: logs, wait and remove, each a request."""
    previous = _forward_signals(ident)
    try:
        with _span("client.logs"):
            out = sys.stdout.buffer
            for chunk in Client().stream(f"/enclaves/{ident}/logs", {"follow": "1"}):
                out.write(chunk)
                out.flush()
        with _span("client.wait"):
            view = _enclave(_call("POST", f"/enclaves/{ident}/wait", timeout=None))
    finally:
        _restore(previous)
    with _span("client.remove"):
        _quiet_call("DELETE", f"/enclaves/{ident}", {"force": "1"})
    return _outcome(view)


def _follow_stream(response: Any) -> int:
    """The attach stream (docs/formats/daemon-api.md): the started enclave, its output, the ended one."""
    try:
        kind, payload = read_frame(response)
        if kind != STARTED:
            raise DaemonError("the Cove daemon's attach stream does not begin with the enclave", UNREACHABLE)
        previous = _forward_signals(_enclave(_document(payload))["id"])
        try:
            with _span("client.logs"):
                out = sys.stdout.buffer
                while (frame := read_frame(response))[0] == OUTPUT:
                    out.write(frame[1])
                    out.flush()
        finally:
            _restore(previous)
        if frame[0] != ENDED:
            raise DaemonError("the Cove daemon's attach stream sent the enclave twice", UNREACHABLE)
        return _outcome(_enclave(_document(frame[1])))
    finally:
        response.close()


def _document(payload: bytes) -> Any:
    try:
        return from_json(payload)
    except (ValueError, RecursionError):  # not JSON, or nested too deep: not an enclave
        return None


def _enclave(view: Any) -> dict[str, Any]:
    """An enclave's view from the API, or a DaemonError when the answer is not one."""
    if not isinstance(view, dict) or not isinstance(view.get("id"), str):
        raise DaemonError(
            "the Cove daemon's answer is not an enclave (is it a Cove daemon of this version?)", UNREACHABLE
        )
    return view


def run_attached(instance: Folder, program: str, args: tuple[str, ...], backend: str | None, signer: str | None) -> int:
    """`cove run` through the daemon: start, copy the output, return the exit code (raises DaemonError).

    One request (the attach upgrade): the daemon streams the output and, once the enclave has ended,
    removes it, as `docker run --rm` does, and sends how it ended.
    """
    body = create_body(instance, program, args, None, backend, "no", signer)
    with _span("client.create"):
        try:
            stream, view = Client().attach(body)
        except NotRunning as exc:
            raise NotRunning(exc.line + HINT, exc.exit_code, exc.status, exc.kind) from None
    if stream is not None:
        return _follow_stream(stream)
    return follow(_enclave(view)["id"])


def parse_run_argv(argv: list[str]) -> tuple[str, str, tuple[str, ...]] | None:
    """(DIR, PROGRAM, ARGS) for exactly `[-C DIR] run PROGRAM ARGS...`, else None."""
    directory, i = ".", 0
    while i < len(argv) and argv[i] != "run":
        if argv[i] == "-C" and i + 1 < len(argv):
            directory, i = argv[i + 1], i + 2
        else:
            return None
    rest = argv[i + 1 :]
    if i >= len(argv) or not rest or rest[0].startswith("-") or not directory:
        return None
    return directory, rest[0], tuple(rest[1:])


def _backend(directory: str) -> str | None:
    """[enclave] backend of the instance's cove.toml; None when it does not say plainly (direct mode only)."""
    import tomllib  # not on the daemon's path: its import costs more than a start's request

    try:
        with open(os.path.join(directory, "cove.toml"), "rb") as handle:
            config = tomllib.load(handle)
    except (OSError, ValueError, RecursionError):  # tomllib recurses on nested arrays and tables
        return None  # the full CLI says what is wrong
    enclave = config.get("enclave", {})
    backend = enclave.get("backend", "auto") if isinstance(enclave, dict) else None
    return backend if isinstance(backend, str) else None


def folder_runs_on_node(directory: Folder) -> bool:
    """Whether the full CLI runs the instance through the daemon (cove.cli.run.runs_on_node without
    --backend): every instance with a cove.toml whose build is not encrypted, whatever its backend (sim
    or vm) and even when cove.toml does not parse (the daemon reports that as direct mode would). So it
    is decided without parsing cove.toml; the full CLI takes the rest (and says why)."""
    return os.path.isfile(os.path.join(directory, "cove.toml")) and not os.path.isdir(
        os.path.join(directory, "build", ENCRYPTED_IMAGE)
    )


def fast_run(argv: list[str]) -> int | None:
    """Run `cove [-C DIR] run PROGRAM ARGS...` without click; None: not handled (the full CLI runs it).

    Through the daemon when one serves this user and plainly runs the instance; directly when no
    daemon does (or COVE_NO_DAEMON is set); anything unsure goes to the full CLI, which decides as before.
    """
    parsed = parse_run_argv(argv)
    if parsed is None:
        return None
    instance, program, args = parsed
    if not os.path.isdir(instance):
        return None
    if not daemon_available():
        return _direct(instance, program, args)
    if not folder_runs_on_node(instance):
        return None  # an encrypted image or a cove.toml to report: the full CLI
    try:
        return _leaving(run_attached(instance, program, args, None, None))
    except DaemonError as exc:
        if exc.kind == HOST_PATHS:
            return _direct(instance, program, args)  # nothing was created: run it as this user
        return _fail(exc.line, exc.exit_code)
    except KeyboardInterrupt:
        return _exit_code("INTERRUPTED")


def _leaving(code: int | None) -> int | None:
    """The exit code of a command handled here, its objects frozen: the interpreter's exit then skips
    collecting them (a few milliseconds of a short run; nothing else changes, atexit handlers run)."""
    if code is not None:
        gc.freeze()
    return code


PS_FLAGS = {"-a": "all", "--all": "all", "-q": "quiet", "--quiet": "quiet", "--json": "json"}


def fast_ps(argv: list[str]) -> int | None:
    """`cove ps [-a] [-q] [--json]` without click; None for any other form (the full CLI's)."""
    return _leaving(_fast_ps(argv))


def _fast_ps(argv: list[str]) -> int | None:
    if not argv or argv[0] != "ps" or any(arg not in PS_FLAGS for arg in argv[1:]):
        return None
    from cove.cli import listing
    from cove.errors import CoveError

    flags = {PS_FLAGS[arg] for arg in argv[1:]}
    try:
        views = _call("GET", "/enclaves", query={"all": "1" if "all" in flags else "0"})
        lines = listing.ps_lines(views, "quiet" in flags, "json" in flags)
    except DaemonError as exc:
        return _fail(exc.line, exc.exit_code)
    except CoveError as exc:
        return _fail(exc.line(), exc.exit_code)
    except KeyboardInterrupt:
        return _exit_code("INTERRUPTED")
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:  # `cove ps | head`: the rest goes nowhere, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _direct(instance: str, program: str, args: tuple[str, ...]) -> int:
    """Direct mode, with cove.cli.main's handling of errors (one line, the code of docs/cli.md)."""
    if _backend(instance) != "vm":  # a vm's guest serves /dev/attestation itself
        from cove.runtime import attestation_early

        attestation_early.prestart()  # first thing: the server's start overlaps all of this one's
    from pathlib import Path

    from cove.cli import direct
    from cove.errors import CoveError, file_system_error

    try:
        return direct.run(Path(instance), program, args)
    except CoveError as exc:
        return _fail(exc.line(), exc.exit_code)
    except OSError as exc:  # a file the run reads or writes: read-only, full disk, I/O error
        error = file_system_error(exc)
        return _fail(error.line(), error.exit_code)
    except KeyboardInterrupt:
        return _exit_code("INTERRUPTED")


def daemon_available() -> bool:
    """Whether `cove run` goes through the daemon: COVE_NO_DAEMON is not set and a daemon answers this user
    (a missing socket is the fast no; a user the daemon refuses runs directly, as without a daemon)."""
    return not os.environ.get("COVE_NO_DAEMON") and _daemon_serves_user()


def _daemon_serves_user() -> bool:
    """A daemon answers this user."""
    with _span("client.version"):
        try:
            return Client().running()
        except DaemonError:
            return False


def _fail(line: str, code: int) -> int:
    if line.startswith("cove: "):  # as cove.cli.main: a verifier's line names the evidence type
        line = "Cove evidence: " + line[len("cove: ") :]
    print(f"cove: error: {line}", file=sys.stderr, flush=True)
    return code
