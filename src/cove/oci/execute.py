"""`cove-runtime exec`: another process in a running container's enclave, as `podman exec`, `ctr task exec` and
CRI ExecSync ask for it.

The process enters the enclave exactly as `cove exec` through the node
service does: cove.daemon.execin (its helper, run here as root) joins the
enclave program's cgroups and namespaces and root, and starts the program
as the enclave's user with every capability dropped, no_new_privs, the
enclave's seccomp filter and open-files limit, its environment and working
folder. What that needs from the measured configuration (user, folder,
environment, limits, the compiled seccomp filter, the entry points) is
worked out once, by the container's process while it waits for `start`
(`save_settings`), and kept in the container's root-owned folder, so
`exec` verifies nothing again and loads no launcher.

process.json may ask only for what the enclave already allows: a program
that is a measured entry point (any program in a debug enclave), the
measured user and working folder, no capability beyond the default set.
Anything else is refused with one line naming the field. Its rlimits are
not used (the measured limits apply), nor are environment names other than
the `[env] passthrough` ones. The pid the engine gets (--pid-file) is
that of the process holding the helper (`_detached`): it relays the
program's exit code (128 + N after signal N), and the program's whole
session ends when the engine sends it SIGTERM or kills it.
"""

from __future__ import annotations

import json
import os
import posixpath
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

from cove.decode import Fields, decode_json
from cove.errors import CoveError, NotFoundError, exit_status
from cove.oci import cli
from cove.oci import spec as spec_mod
from cove.oci.spec import BundleError
from cove.runtime.procfs import enclave_program, process_start
from cove.util import entry_point_allows

MAX_PROCESS = 1 << 20  # process.json is a few hundred bytes; engines never send more
PROGRAM_WAIT = 10.0  # a container that was just started may not have its program yet


SETTINGS = "exec.json"
SETTINGS_KEYS = (
    "uid",
    "gid",
    "cwd",
    "env",
    "passthrough",
    "secret_env",
    "max_open_files",
    "seccomp",
    "entry_points",
    "debug",
    "root",
)
MAX_SETTINGS = 1 << 20  # the environment and the seccomp filter in hex: a few KiB


def save_settings(prepared: Any, folder: Path) -> None:
    """Write settings(prepared) into the container's folder (temp file and rename), before `start`."""
    tmp = folder / f".{SETTINGS}.tmp"
    tmp.write_text(json.dumps(settings(prepared)))
    os.replace(tmp, folder / SETTINGS)


def settings(prepared: Any) -> dict[str, Any]:
    """What exec needs of the measured configuration (a cove.oci.launch.Prepared), for the container's state."""
    from cove.runtime import launcher, seccomp

    config = prepared.verified.config
    bundle = prepared.bundle
    if prepared.encrypted is None:
        uid, gid = launcher.resolve_user(config.process.user, prepared.root)
    else:  # a name would be in the ciphertext: the bundle's ids (which the launcher checks against it)
        uid, gid = bundle.process.uid, bundle.process.gid
    passthrough = list(config.env.passthrough)
    given = {n: v for n, v in bundle.process.env.items() if n in passthrough and not n.startswith("COVE_")}
    return {
        "uid": uid,
        "gid": gid,
        "cwd": posixpath.normpath(config.process.cwd),
        "env": launcher.build_environment(config, given),
        "passthrough": passthrough,
        "secret_env": [s.where for s in config.secrets if s.kind == "env"],
        "max_open_files": config.resources.max_open_files,
        "seccomp": seccomp.compile_filter(config.network.mode, io_uring=config.security.io_uring).hex(),
        "entry_points": list(config.process.entry_points),
        "debug": bool(config.enclave.debug),
        "root": str(prepared.root) if prepared.encrypted is None else None,
    }


def read_settings(path: str | Path) -> dict[str, Any]:
    """The container's exec settings (as :func:`settings` wrote them), each field checked; ValueError if not."""
    with open(path, "rb") as handle:
        data = handle.read(MAX_SETTINGS + 1)
    fields = Fields(decode_json(data, ValueError, SETTINGS, limit=MAX_SETTINGS), SETTINGS, ValueError, SETTINGS_KEYS)
    env = fields.value("env", dict)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in cast(dict[object, object], env).items()):
        raise fields.fail("env", "must map names to text strings")
    return {
        "uid": fields.integer("uid", 0, 2**32 - 1),
        "gid": fields.integer("gid", 0, 2**32 - 1),
        "cwd": fields.text("cwd", max_len=4096),
        "env": env,
        "passthrough": fields.strings("passthrough"),
        "secret_env": fields.strings("secret_env"),
        "max_open_files": fields.integer("max_open_files", 1, 1 << 20),
        "seccomp": fields.hex("seccomp").hex(),
        "entry_points": fields.strings("entry_points"),
        "debug": fields.boolean("debug"),
        "root": fields.value("root", (str, type(None))),
    }


def read_process(path: str) -> spec_mod.Process:
    """process.json, read through cove.decode and checked as config.json's process is (one BundleError line)."""
    try:
        data = spec_mod.read_document(path, "process.json", MAX_PROCESS)
    except FileNotFoundError:
        raise NotFoundError(f"--process {path} does not exist") from None
    return spec_mod.parse_process(data, "process.json")


def helper_spec(process: spec_mod.Process, allowed: dict[str, Any]) -> dict[str, Any]:
    """The request for cove.daemon.execin; refuses what the enclave does not allow."""
    if (process.uid, process.gid) != (allowed["uid"], allowed["gid"]):
        raise BundleError(
            f"process.json: user {process.uid}:{process.gid} is not the enclave's measured user "
            f"{allowed['uid']}:{allowed['gid']}"
        )
    if process.cwd != allowed["cwd"]:
        raise BundleError(f"process.json: cwd {process.cwd} is not the enclave's measured cwd {allowed['cwd']}")
    root = allowed.get("root")
    program = spec_mod.program_path(process, Path(root) if root else None, "process.json")
    if not allowed["debug"] and not entry_point_allows(program, allowed["entry_points"]):
        raise BundleError(
            f"process.json: args[0] {program} is not an entry point of this enclave (allowed: "
            f"{', '.join(allowed['entry_points'])}; any program only in a debug enclave)"
        )
    env = dict(allowed["env"])
    for name in allowed["passthrough"]:
        if name in process.env and not name.startswith("COVE_"):
            env[name] = process.env[name]
    return {
        "argv": [program, *process.args[1:]],
        "uid": allowed["uid"],
        "gid": allowed["gid"],
        "cwd": allowed["cwd"],
        "env": env,
        "secret_env": allowed["secret_env"],
        "max_open_files": allowed["max_open_files"],
        "seccomp": allowed["seccomp"],
        "tty": process.terminal,
    }


def run(
    root: str, ident: str, process_file: str, console_socket: str | None, tty: bool, detach: bool, pid_file: str | None
) -> int:
    """Start the process in the container's enclave; with --detach return at once, else its exit code."""
    container = cli.Container(root, ident)
    state = container.load()
    status = container.status(state)
    if status != "running":
        raise CoveError(f"container {ident} is {status}: exec needs a running container")
    process = read_process(process_file)
    if tty:
        process = spec_mod.Process(
            process.args, process.env, process.cwd, process.uid, process.gid, True, process.rlimits
        )
    if process.terminal and not console_socket:
        raise BundleError("process.json: terminal is true but no --console-socket was given")
    # just after `start` the container's process may still be on its way to the launch; once the program
    # runs, the settings it wrote before reading `start` are there
    deadline = time.monotonic() + PROGRAM_WAIT
    while (program := enclave_program(cli.launcher_pid(state))) is None:
        if time.monotonic() >= deadline or container.status(state) != "running":
            raise CoveError(f"container {ident} has no running program to join")
        time.sleep(0.02)
    try:
        allowed = read_settings(container.path(SETTINGS))
    except (OSError, ValueError):
        raise CoveError(
            f"container {ident} has no exec settings (created by an older cove-runtime)", "recreate the container"
        ) from None
    request = helper_spec(process, allowed)
    found = process_start(program)
    if found is None:
        raise CoveError(f"container {ident} has no running program to join")
    request["start"] = found  # the helper checks it is still that process (a pid can be reused)
    if not detach:
        helper = _start(program, request, console_socket if process.terminal else None)
        if pid_file:
            _write_pid(pid_file, helper.pid)
        return exit_status(helper.wait())
    return _detached(program, request, console_socket if process.terminal else None, pid_file)


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def _detached(program: int, request: dict[str, Any], console_socket: str | None, pid_file: str | None) -> int:
    """--detach: a small process of ours (its pid in --pid-file) holds the helper and outlives this command.

    The helper dies with its parent (PR_SET_PDEATHSIG), so its parent must be
    the process the engine watches: the engine (a subreaper) inherits it, reaps
    it, and gets the program's exit code from it; a signal the engine sends it
    goes to the helper (SIGTERM ends the program's session), and a SIGKILL of
    it takes the helper and the program along.

    Once the program runs, neither it nor the helper keeps this command's
    stdout and stderr: an engine that reads them to the end (containerd's
    shim does for `exec` with a terminal) would otherwise wait for the
    program's exit before it takes the terminal from the console socket, and
    a short program's output would be lost.
    """
    ready, told = os.pipe()
    holder = os.fork()
    if holder == 0:
        os.close(ready)
        code = 125
        try:
            helper = _start(program, request, console_socket)
            for number in FORWARDED:
                signal.signal(number, lambda signum, _frame: helper.send_signal(signum))
            os.write(told, b"ok")
            os.close(told)
            _let_go_of_stdio()
            code = exit_status(helper.wait())
        except CoveError as exc:
            os.write(told, f"{int(exc.exit_code)} {exc.line()}".encode())
            code = int(exc.exit_code)
        except BaseException as exc:  # a forked child never returns into the command line
            os.write(told, f"125 {type(exc).__name__}: {exc}".encode())
        finally:
            os._exit(code & 0xFF)
    os.close(told)
    with os.fdopen(ready, "rb") as answer:
        said = answer.read().decode("utf-8", "replace")
    if said != "ok":
        os.waitpid(holder, 0)
        given, _, line = said.partition(" ")
        error = CoveError(line or "the exec process ended before the program started")
        error.exit_code = int(given) if given.isdigit() else 125
        raise error
    if pid_file:
        _write_pid(pid_file, holder)
    return 0


def _let_go_of_stdio() -> None:
    """Point this process's stdin, stdout and stderr at /dev/null (see _detached)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _start(program: int, request: dict[str, Any], console_socket: str | None) -> subprocess.Popen[bytes]:
    """Run cove.daemon.execin for the enclave program's pid; its spec over a socket pair, the terminal back.

    With a terminal the program's stdio is the terminal, so the helper gets
    none of ours: its error line, if the terminal never comes, is read from
    a pipe and raised here.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    quiet = console_socket is not None
    try:
        helper = subprocess.Popen(
            [sys.executable, "-m", "cove.daemon.execin", str(program), str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL if quiet else None,
            stdout=subprocess.DEVNULL if quiet else None,
            stderr=subprocess.PIPE if quiet else None,
        )
    finally:
        theirs.close()
    try:
        with ours:
            ours.sendall(json.dumps(request).encode())
            ours.shutdown(socket.SHUT_WR)
            if console_socket is not None:
                _hand_terminal(ours, console_socket)
    except BaseException as exc:
        helper.kill()
        helper.wait()
        said = _error_line(helper)
        if said and isinstance(exc, CoveError):
            raise CoveError(said) from None
        raise
    return helper


def _error_line(helper: subprocess.Popen[bytes]) -> str:
    """The helper's last `cove: error: …` line from its stderr pipe (a terminal exec that failed), or ""."""
    if helper.stderr is None:
        return ""
    with helper.stderr:
        text = helper.stderr.read(65536).decode("utf-8", "replace")
    lines = [line for line in text.splitlines() if line.startswith("cove: error: ")]
    return lines[-1][len("cove: error: ") :] if lines else ""


def _write_pid(pid_file: str, pid: int) -> None:
    tmp = Path(pid_file).with_name(f".{Path(pid_file).name}.tmp")
    tmp.write_text(str(pid))
    os.replace(tmp, pid_file)


def _hand_terminal(control: socket.socket, console_socket: str) -> None:
    """The pty master the helper opened in the enclave goes to the engine over its console socket."""
    try:
        _, fds, _, _ = socket.recv_fds(control, 16, 1)
    except OSError as exc:
        raise CoveError(f"the enclave's terminal did not arrive: {exc.strerror or exc}") from None
    if not fds:
        raise CoveError("the enclave's terminal did not arrive (the helper could not enter the enclave)")
    master = fds[0]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(console_socket)
            socket.send_fds(sock, [b"/dev/ptmx"], [master])
    except OSError as exc:
        raise CoveError(f"--console-socket {console_socket}: {exc.strerror or exc}") from None
    finally:
        os.close(master)
