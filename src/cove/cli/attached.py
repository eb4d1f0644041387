"""`cove run` through the daemon, standard library only (with cove.daemon.client and cove.errors).

`cove [-C DIR] run PROGRAM ARGS...` is the command run most often; when a
daemon answers, its client needs neither click nor the runtime, which cost
more to import than the enclave takes to run. :func:`fast_run` handles that
exact common case before click is imported and returns None for anything
else (options, another backend, an encrypted image, no daemon, a user the
daemon refuses), which then goes through the full CLI with the same result.
:func:`run_attached` is what both paths run.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import tomllib
from pathlib import Path
from types import FrameType
from typing import Any

from cove import trace
from cove.daemon.client import UNREACHABLE, Client, DaemonError, NotRunning
from cove.errors import ExitCode

NODE_BACKENDS = ("auto", "sim")
ENCRYPTED_IMAGE = "image.enc"  # cove.image.encryption.ENCRYPTED_IMAGE: such a build runs directly
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
HINT = " (start it with `sudo cove daemon` or `systemctl start cove`)"


def create_body(instance: Path, program: str, args: tuple[str, ...], name: str | None, backend: str | None,
                restart: str, signer: str | None) -> dict[str, Any]:
    """The POST /enclaves request of `cove run` and `cove run -d`."""
    return {"instance": str(instance.resolve()), "program": program, "args": list(args), "name": name,
            "backend": backend, "restart": restart, "signer": signer, "env": dict(os.environ)}


def _call(method: str, route: str, body: dict[str, Any] | None = None, query: dict[str, Any] | None = None,
          timeout: float | None = 60.0) -> Any:
    try:
        return Client().call(method, route, body, query, timeout)
    except NotRunning as exc:
        raise NotRunning(exc.line + HINT, exc.exit_code, exc.status, exc.kind) from None


def _quiet_call(method: str, route: str, query: dict[str, Any] | None = None) -> None:
    try:
        Client().call(method, route, None, query)
    except DaemonError:
        pass


def follow(ident: str) -> int:
    """Copy the started enclave's output, forward Ctrl-C and SIGTERM, remove it at the end; its exit code."""
    previous: dict[int, Any] = {}

    def forward(signum: int, _frame: FrameType | None) -> None:
        threading.Thread(target=_quiet_call, args=("POST", f"/enclaves/{ident}/kill", {"signal": str(signum)}),
                         daemon=True).start()

    for signum in FORWARDED:
        previous[signum] = signal.signal(signum, forward)
    try:
        with trace.span("client.logs"):
            out = sys.stdout.buffer
            for chunk in Client().stream(f"/enclaves/{ident}/logs", {"follow": "1"}):
                out.write(chunk)
                out.flush()
        with trace.span("client.wait"):
            view = _enclave(_call("POST", f"/enclaves/{ident}/wait", timeout=None))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    with trace.span("client.remove"):
        _quiet_call("DELETE", f"/enclaves/{ident}", {"force": "1"})
    code = view.get("exit_code")
    if not isinstance(code, int) or isinstance(code, bool):
        code = 0 if code is None and not view.get("error") else ExitCode.SANDBOX
    if view.get("error"):
        raise DaemonError(str(view["error"]), code)
    return code


def _enclave(view: Any) -> dict[str, Any]:
    """An enclave's view from the API, or a DaemonError when the answer is not one."""
    if not isinstance(view, dict) or not isinstance(view.get("id"), str):
        raise DaemonError("the Cove daemon's answer is not an enclave (is it a Cove daemon of this version?)",
                          UNREACHABLE)
    return view


def run_attached(instance: Path, program: str, args: tuple[str, ...], backend: str | None,
                 signer: str | None) -> int:
    """`cove run` through the daemon: start, copy the output, return the exit code (raises DaemonError).

    The enclave is removed once it has ended, as `docker run --rm` does.
    """
    with trace.span("client.create"):
        view = _enclave(_call("POST", "/enclaves", create_body(instance, program, args, None, backend, "no", signer),
                              timeout=3600))
    return follow(view["id"])


def _parse(argv: list[str]) -> tuple[str, str, tuple[str, ...]] | None:
    """(DIR, PROGRAM, ARGS) for exactly `[-C DIR] run PROGRAM ARGS...`, else None."""
    directory, i = ".", 0
    while i < len(argv) and argv[i] != "run":
        if argv[i] == "-C" and i + 1 < len(argv):
            directory, i = argv[i + 1], i + 2
        else:
            return None
    rest = argv[i + 1:]
    if i >= len(argv) or not rest or rest[0].startswith("-") or not directory:
        return None
    return directory, rest[0], tuple(rest[1:])


def _node_runs(directory: Path) -> bool:
    """Whether the instance is plainly one the daemon's store runs (sim, not encrypted); False when unsure."""
    try:
        with open(directory / "cove.toml", "rb") as handle:
            config = tomllib.load(handle)
    except (OSError, ValueError):
        return False  # the full CLI says what is wrong
    enclave = config.get("enclave", {})
    backend = enclave.get("backend", "auto") if isinstance(enclave, dict) else None
    return backend in NODE_BACKENDS and not (directory / "build" / ENCRYPTED_IMAGE).is_dir()


def fast_run(argv: list[str]) -> int | None:
    """Run `cove [-C DIR] run PROGRAM ARGS...` through the daemon without the full CLI; None: not handled."""
    parsed = _parse(argv)
    if parsed is None or os.environ.get("COVE_NO_DAEMON"):
        return None
    directory, program, args = parsed
    instance = Path(directory)
    if not instance.is_dir() or not _node_runs(instance):
        return None
    if not _daemon_serves_user():
        return None  # no daemon, or one that refuses this user: direct mode, as the full CLI does
    try:
        with trace.span("client.create"):
            view = _enclave(_call("POST", "/enclaves", create_body(instance, program, args, None, None, "no", None),
                                  timeout=3600))
        return follow(view["id"])
    except DaemonError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


def _daemon_serves_user() -> bool:
    """As cove.cli.lifecycle.daemon_available: a daemon answers this user (a missing socket is the fast no)."""
    with trace.span("client.version"):
        try:
            return Client().running()
        except DaemonError:
            return False


def _fail(exc: DaemonError) -> int:
    line = exc.line
    if line.startswith("cove: "):  # as cove.cli.main: a verifier's line names the evidence type
        line = "Cove evidence: " + line[len("cove: "):]
    print(f"cove: error: {line}", file=sys.stderr, flush=True)
    return exc.exit_code
