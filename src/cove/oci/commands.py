"""`cove-runtime`: an OCI runtime that engines call as they call runc, running Cove enclaves.

    cove-runtime [--root DIR] [--log FILE] [--log-format text|json] COMMAND ...
    create --bundle DIR [--pid-file F] [--console-socket S] ID | start ID | state ID
    kill [--all] ID [SIGNAL] | delete [--force] ID | features | --version

`create` reads config.json, verifies the root file system against the
signed build under /.cove/ and copies the signed tree into a private root,
all before anything runs; then it leaves one process behind (the
container's pid, as runc's init), which waits for `start` on a FIFO and
then launches the enclave through Cove's launcher (services such as
/dev/attestation and [[secrets]] included) and exits with the program's
code. State lives in ROOT/ID (default /run/cove-runtime). Errors are one
line on stderr (and in --log, as JSON when asked), exit codes from
docs/cli.md. docs/containers.md says how engines use it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cove import __version__
from cove.errors import CoveError, ExitCode, NotFoundError
from cove.oci import spec as spec_mod

DEFAULT_ROOT = "/run/cove-runtime"
STATE = "state.json"
FIFO = "start.fifo"
SPEC_VERSION = "1.1.0"


class RuntimeError_(CoveError):
    """A request the container's state does not allow (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, usage exit code
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


# -- state

def _start_time(pid: int) -> tuple[int, str] | None:
    """(start time in ticks, state letter) of pid, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[19]), fields[0].decode()


class Container:
    def __init__(self, root: Path, ident: str):
        if not ident or "/" in ident or ident.startswith(".") or len(ident) > 1024:
            raise CoveError(f"{ident!r} is not a container id")
        self.id = ident
        self.dir = Path(root) / ident

    def load(self) -> dict:
        try:
            return json.loads((self.dir / STATE).read_text())
        except FileNotFoundError:
            raise NotFoundError(f"container {self.id} does not exist") from None
        except ValueError:
            raise CoveError(f"container {self.id}: its state is damaged", "delete it with --force") from None

    def save(self, state: dict) -> None:
        tmp = self.dir / f".{STATE}.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.dir / STATE)

    def status(self, state: dict) -> str:
        found = _start_time(state["pid"]) if state.get("pid") else None
        if found is None or found[0] != state.get("pid_start") or found[1] in "ZX":
            return "stopped"
        return "running" if (self.dir / "started").exists() else "created"


# -- commands

def cmd_create(args) -> int:
    from cove.oci import launch

    container = Container(Path(args.root), args.id)
    bundle = spec_mod.load(Path(args.bundle))
    Path(args.root).mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        container.dir.mkdir(mode=0o700)
    except FileExistsError:
        raise CoveError(f"container {args.id} already exists", "delete it first, or choose another id") from None
    pid = None
    try:
        prepared = launch.prepare(bundle, container.dir)
        console = None
        if bundle.process.terminal:
            if not args.console_socket:
                raise spec_mod.BundleError("config.json: process.terminal is true but no --console-socket was given")
            console = _open_console(args.console_socket)
        os.mkfifo(container.dir / FIFO, 0o600)
        pid = launch.spawn(prepared, container.dir / FIFO, console, args.preserve_fds)
        found = _start_time(pid)
        container.save({"id": args.id, "pid": pid, "pid_start": found[0] if found else None, "cgroups": _cgroups(),
                        "bundle": str(Path(args.bundle).resolve()), "created": time.time(),
                        "annotations": bundle.annotations, "unmeasured": prepared.unmeasured})
        if args.pid_file:
            tmp = Path(args.pid_file).with_name(f".{Path(args.pid_file).name}.tmp")
            tmp.write_text(str(pid))
            os.replace(tmp, args.pid_file)
    except BaseException:
        if pid is not None:  # e.g. an unwritable --pid-file: the waiting process must not outlive the refusal
            _kill_and_wait(pid, _start_time(pid)[0] if _start_time(pid) else None)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        _cleanup(container.dir)
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


def cmd_start(args) -> int:
    container = Container(Path(args.root), args.id)
    state = container.load()
    status = container.status(state)
    if status != "created":
        raise RuntimeError_(f"container {args.id} is {status}, not created: only a created container starts")
    try:
        fd = os.open(container.dir / FIFO, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        raise RuntimeError_(f"container {args.id} is no longer waiting to start") from None
    try:
        (container.dir / "started").touch()
        os.write(fd, b"1")
    finally:
        os.close(fd)
    return 0


def cmd_state(args) -> int:
    container = Container(Path(args.root), args.id)
    state = container.load()
    status = container.status(state)
    out = {"ociVersion": SPEC_VERSION, "id": args.id, "status": status,
           "pid": state["pid"] if status != "stopped" else 0, "bundle": state["bundle"],
           "annotations": state.get("annotations", {})}
    if state.get("unmeasured"):
        out["annotations"] = dict(out["annotations"], **{f"{spec_mod.DOMAIN}/unmeasured": "true"})
    print(json.dumps(out, indent=2))
    return 0


def _signal_number(text: str) -> int:
    name = text.upper()
    if name.isdigit():
        number = int(name)
    else:
        name = name if name.startswith("SIG") else "SIG" + name
        number = getattr(signal.Signals, name, None) if name in signal.Signals.__members__ else None
        if number is None:
            raise CoveError(f"{text!r} is not a signal", "e.g. SIGTERM, KILL or 9")
    if not 0 < int(number) < signal.NSIG:
        raise CoveError(f"{text!r} is not a signal", "e.g. SIGTERM, KILL or 9")
    return int(number)


def cmd_kill(args) -> int:
    container = Container(Path(args.root), args.id)
    state = container.load()
    number = _signal_number(args.signal)
    if container.status(state) == "stopped":
        raise RuntimeError_(f"container not running: {args.id}")
    try:
        os.kill(state["pid"], number)
    except ProcessLookupError:
        raise RuntimeError_(f"container not running: {args.id}") from None
    return 0


def cmd_delete(args) -> int:
    container = Container(Path(args.root), args.id)
    if not container.dir.exists():
        if args.force:
            return 0  # runc: delete --force of what is gone succeeds
        raise NotFoundError(f"container {args.id} does not exist")
    try:
        state = container.load()
    except CoveError:
        if not args.force:
            raise
        state = {}
    status = container.status(state) if state else "stopped"
    if status == "running" and not args.force:
        raise RuntimeError_(f"container {args.id} is running", "stop it first, or delete --force")
    if status != "stopped":
        _kill_and_wait(state["pid"], state.get("pid_start"))
    _cleanup(container.dir)
    if state.get("pid"):
        _remove_cgroups(state.get("cgroups", []), state["pid"])
    return 0


def _cgroups() -> list[str]:
    """The cgroup folders the launcher makes its enclave's groups in (those of this process, inherited)."""
    found = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        _, controllers, path = line.split(":", 2)
        names = controllers.split(",")
        if controllers == "" or "memory" in names or "pids" in names:
            base = "/sys/fs/cgroup" if controllers == "" else f"/sys/fs/cgroup/{controllers}"
            found.append(base + path)
    return found


def _remove_cgroups(parents: list[str], pid: int) -> None:
    """The empty groups a killed container process left (named cove-PID-… by cove.runtime.limits)."""
    for parent in parents:
        for group in Path(parent).glob(f"cove-{pid}-*"):
            try:
                group.rmdir()
            except OSError:
                pass


def _kill_and_wait(pid: int, start) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(200):
        found = _start_time(pid)
        if found is None or found[0] != start or found[1] in "ZX":
            return
        time.sleep(0.01)


def _cleanup(folder: Path) -> None:
    """Remove a container's folder and anything a killed launch left mounted below it."""
    try:
        with open("/proc/self/mounts") as mounts:
            points = [line.split()[1].encode().decode("unicode_escape") for line in mounts]
    except OSError:
        points = []
    prefix = str(folder) + "/"
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def cmd_features(_args) -> int:
    features = {
        "ociVersionMin": "1.0.0", "ociVersionMax": SPEC_VERSION,
        "hooks": [], "mountOptions": [],
        "linux": {"namespaces": ["pid", "ipc", "uts", "mount", "network", "user", "cgroup"],
                  "capabilities": [], "cgroup": {"v1": True, "v2": True, "systemd": False},
                  "seccomp": {"enabled": True}, "apparmor": {"enabled": False}, "selinux": {"enabled": False}},
        "annotations": {"io.github.cove.runtime.version": __version__,
                        f"{spec_mod.DOMAIN}/unmeasured-debug": "accepted: run an unsigned image as an "
                                                               "unmeasured debug enclave"},
    }
    print(json.dumps(features, indent=2))
    return 0


COMMANDS = {"create": cmd_create, "start": cmd_start, "state": cmd_state, "kill": cmd_kill,
            "delete": cmd_delete, "features": cmd_features}


def _log(args, line: str) -> None:
    if not getattr(args, "log", None):
        return
    try:
        with open(args.log, "a") as handle:
            if args.log_format == "json":
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                handle.write(json.dumps({"level": "error", "msg": line, "time": stamp}) + "\n")
            else:
                handle.write(f"cove-runtime: error: {line}\n")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = argparse.Namespace(log=None, log_format="text", debug=False)
    try:
        args = parser().parse_args(argv)
        if args.version:
            print(f"cove-runtime version {__version__}\nspec: {SPEC_VERSION}")
            return 0
        if args.node_root:
            os.environ["COVE_NODE_ROOT"] = args.node_root  # read by cove.oci.launch in the container's process
        if not args.command:
            raise CoveError("a command is needed", "create, start, state, kill, delete or features")
        return COMMANDS[args.command](args)
    except CoveError as exc:
        _log(args, exc.line())
        print(f"cove-runtime: error: {exc.line()}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)
    except OSError as exc:
        from cove.errors import file_system_error

        error = file_system_error(exc)
        _log(args, error.line())
        print(f"cove-runtime: error: {error.line()}", file=sys.stderr)
        if args.debug:
            raise
        return int(error.exit_code)


def run_main() -> None:
    sys.exit(main())
