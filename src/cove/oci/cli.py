"""`cove-runtime`: an OCI runtime that engines call as they call runc, running Cove enclaves.

    cove-runtime [--root DIR] [--log FILE] [--log-format text|json] COMMAND ...
    create --bundle DIR [--pid-file F] [--console-socket S] ID | start ID | state ID
    exec --process FILE [--tty --console-socket S] [--detach --pid-file F] ID
    kill [--all] ID [SIGNAL] | delete [--force] ID | features | --version

Engines call `state`, `start`, `kill` and `delete` many times per container,
so this entry module answers them with the standard library alone, and
`start`, `kill` and `delete` with its built-in modules alone: no `json`,
`re`, `enum` or `signal` (`re` and `enum` alone are ~5 ms of a ~15 ms call
here). A container's state is therefore kept with `marshal` (below), and
cove.errors, the `signal` module's names and `json` load only on the paths
that need them (an error, a signal given by name, `state`, `features`).
`create` with its usual options goes straight to cove.oci.create (which
verifies and forks the container's process); `exec` and anything this
module does not recognise (`--help`, a bad option) load cove.oci.commands,
the full command line. State lives in ROOT/ID (default /run/cove-runtime). Errors are
one line on stderr (and in --log, as JSON when asked), exit codes from
docs/cli.md. docs/containers.md says how engines use it.
"""

from __future__ import annotations

import marshal
import os
import sys
import time

TYPE_CHECKING = False  # typing (and pathlib) would cost the hot commands a few ms each: plain str paths here
if TYPE_CHECKING:
    from typing import Any, TypeGuard

    from cove.errors import CoveError

    State = dict[str, Any]  # a container's state

DEFAULT_ROOT = "/run/cove-runtime"
# The runtime's own record of a container, in marshal's format: a built-in module, where json would load re
# and enum. Only the runtime writes it, in ROOT (root's, mode 0700: the trust of the verified copy beside it).
STATE = "state.marshal"
LEGACY_STATE = "state.json"  # what cove-runtime wrote before: still read, so an upgrade strands no container
FIFO = "start.fifo"
SPEC_VERSION = "1.1.0"
UNMEASURED = "cove.dev/unmeasured"  # the state annotation of an unmeasured debug run (cove.oci.DOMAIN)
SIGKILL = 9  # Linux's: the signal module would load enum


def error(message: str, hint: str | None = None, *, not_found: bool = False) -> CoveError:
    """The error to raise (exit 2, or 8 when not_found); cove.errors (re, enum) loads only on a path that fails."""
    from cove.errors import CoveError, NotFoundError

    return (NotFoundError if not_found else CoveError)(message, hint)


# -- state


def start_time(pid: int) -> tuple[int, str] | None:
    """(start time in ticks, state letter) of pid, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[19]), fields[0].decode()


PID_LIMIT = 1 << 22  # Linux's PID_MAX_LIMIT: a larger "pid" is no process's
STRINGS = ("cgroups", "container_cgroups", "engine_cgroups")  # lists of absolute folder names


def well_formed(found: object) -> TypeGuard[State]:
    """Whether a loaded state has every field the commands use, each of its type (a damaged one is one line).

    Required: `pid` (0 <= pid < PID_LIMIT, not a bool: a negative one would
    signal a process group) and `bundle`; optional: `id`, `pid_start`,
    `created`, `annotations`, `unmeasured`, the cgroup lists and, for a
    container created through the resident helper (cove.oci.resident, where
    `pid` is the stub the engine watches), `enclave_pid` and `enclave_start`
    of the container's own process, each checked when present. Unknown keys
    are left alone.
    """
    if not isinstance(found, dict):
        return False
    pid = found.get("pid")
    if type(pid) is not int or not 0 <= pid < PID_LIMIT or not isinstance(found.get("bundle"), str):
        return False
    if not isinstance(found.get("id", ""), str) or type(found.get("unmeasured", False)) is not bool:
        return False
    for key in ("pid_start", "enclave_start"):
        if found.get(key) is not None and type(found[key]) is not int:
            return False
    enclave = found.get("enclave_pid")
    if enclave is not None and (type(enclave) is not int or not 0 < enclave < PID_LIMIT):
        return False
    created = found.get("created", 0)
    if type(created) not in (int, float):
        return False
    annotations = found.get("annotations", {})
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        return False
    for key in STRINGS:
        value = found.get(key, [])
        if not isinstance(value, list) or not all(
            isinstance(v, str) and v.startswith("/") and "\0" not in v for v in value
        ):
            return False
    return True


class Container:
    """A container's folder ROOT/ID and its state (STATE)."""

    def __init__(self, root: str, ident: str) -> None:
        if not ident or "/" in ident or ident.startswith(".") or len(ident) > 1024:
            raise error(f"{ident!r} is not a container id")
        self.id = ident
        self.dir = os.path.join(root, ident)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def load(self) -> State:
        try:
            with open(self.path(STATE), "rb") as handle:
                found = marshal.loads(handle.read(1 << 20))
        except FileNotFoundError:
            found = self._load_json()
        except (ValueError, EOFError, TypeError):
            found = None
        if not well_formed(found):
            raise error(f"container {self.id}: its state is damaged", "delete it with --force")
        return found

    def _load_json(self) -> object:
        """The state.json of a container an earlier cove-runtime created (still running across an upgrade)."""
        import json

        try:
            with open(self.path(LEGACY_STATE), "rb") as handle:
                return json.loads(handle.read(1 << 20))
        except FileNotFoundError:
            raise error(f"container {self.id} does not exist", not_found=True) from None
        except (ValueError, RecursionError):
            return None

    def save(self, state: State) -> None:
        tmp = self.path(f".{STATE}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(marshal.dumps(state))
        os.replace(tmp, self.path(STATE))

    def status(self, state: State) -> str:
        found = start_time(state["pid"]) if state.get("pid") else None
        if found is None or found[0] != state.get("pid_start") or found[1] in "ZX":
            return "stopped"
        return "running" if os.path.exists(self.path("started")) else "created"


# -- the hot commands


def cmd_start(root: str, ident: str) -> int:
    container = Container(root, ident)
    state = container.load()
    status = container.status(state)
    if status != "created":
        raise error(f"container {ident} is {status}, not created: only a created container starts")
    try:
        fd = os.open(container.path(FIFO), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        raise error(f"container {ident} is no longer waiting to start") from None
    try:
        os.close(os.open(container.path("started"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        os.write(fd, b"1")
    finally:
        os.close(fd)
    return 0


def cmd_state(root: str, ident: str) -> int:
    import json

    container = Container(root, ident)
    state = container.load()
    status = container.status(state)
    out = {
        "ociVersion": SPEC_VERSION,
        "id": ident,
        "status": status,
        "pid": state["pid"] if status != "stopped" else 0,
        "bundle": state["bundle"],
        "annotations": state.get("annotations", {}),
    }
    if state.get("unmeasured"):
        out["annotations"] = dict(out["annotations"], **{UNMEASURED: "true"})
    print(json.dumps(out, indent=2))
    return 0


NSIG = 65  # Linux's signals are 1..64 (signal.NSIG)
COMMON_SIGNALS = {"SIGTERM": 15, "SIGKILL": 9, "SIGINT": 2, "SIGHUP": 1, "SIGQUIT": 3}  # what engines send


def signal_number(text: str) -> int:
    name = text.upper()
    if name.isdigit():
        number = int(name)
    else:
        name = name if name.startswith("SIG") else "SIG" + name
        if name in COMMON_SIGNALS:
            number = COMMON_SIGNALS[name]
        else:
            import signal

            if name not in signal.Signals.__members__:
                raise error(f"{text!r} is not a signal", "e.g. SIGTERM, KILL or 9")
            number = int(signal.Signals[name])
    if not 0 < number < NSIG:
        raise error(f"{text!r} is not a signal", "e.g. SIGTERM, KILL or 9")
    return number


def cmd_kill(root: str, ident: str, signal_text: str, all_processes: bool = False) -> int:
    """Signal the container's process; with --all also every process left in the enclave's cgroups.

    As runc, `kill --all` of a stopped container succeeds (containerd's shim
    sends it after every exit, to reach what the first process left behind);
    without --all a stopped container is an error.
    """
    container = Container(root, ident)
    state = container.load()
    number = signal_number(signal_text)
    running = container.status(state) != "stopped"
    if running:
        try:
            os.kill(state["pid"], number)
        except ProcessLookupError:
            running = False
    if all_processes:
        for pid in enclave_processes(state):
            try:
                os.kill(pid, number)
            except ProcessLookupError:
                pass
        return 0
    if not running:
        raise error(f"container not running: {ident}")
    return 0


def launcher_pid(state: State) -> int:
    """The container's own process (the launcher, which names its cgroups cove-PID-…): the stub's when resident."""
    return int(state.get("enclave_pid") or state.get("pid") or 0)


def enclave_processes(state: State) -> list[int]:
    """The pids in the cgroups the container's launcher made (cove-PID-… below the recorded parents)."""
    found: list[int] = []
    launcher = launcher_pid(state)
    if not launcher:
        return found
    for group in state.get("container_cgroups", []):  # the launcher, once it joined the engine's group
        try:
            with open(os.path.join(group, "cgroup.procs")) as handle:
                found.extend(int(p) for p in handle.read().split())
        except (OSError, ValueError):
            continue
    for parent in state.get("cgroups", []):
        try:
            names = [n for n in os.listdir(parent) if n.startswith(f"cove-{launcher}-")]
        except OSError:
            continue
        for name in names:
            try:
                with open(os.path.join(parent, name, "cgroup.procs")) as handle:
                    found.extend(int(p) for p in handle.read().split())
            except (OSError, ValueError):
                continue
    return sorted(set(found))


def cmd_delete(root: str, ident: str, force: bool) -> int:
    """Remove a stopped container (a running one only with --force)."""
    container = Container(os.path.realpath(root), ident)  # the mount table names real paths
    if not os.path.exists(container.dir):
        if force:
            return 0  # runc: delete --force of what is gone succeeds
        raise error(f"container {ident} does not exist", not_found=True)
    try:
        state = container.load()
    except Exception as exc:
        from cove.errors import CoveError, NotFoundError

        if isinstance(exc, NotFoundError):
            state = {}  # a create that failed half-way, or a concurrent delete
        elif force and isinstance(exc, CoveError):
            state = {}  # damaged
        else:
            raise
    status = container.status(state) if state else "stopped"
    if status == "running" and not force:
        raise error(f"container {ident} is running", "stop it first, or delete --force")
    if status != "stopped":
        kill_and_wait(state["pid"], state.get("pid_start"))
    if state.get("enclave_pid"):  # resident: the stub's end makes its worker kill this too; do not wait for that
        kill_exact(state["enclave_pid"], state.get("enclave_start"))
    for _ in range(300):  # what the killed launcher left in the enclave's groups dies before they are removed
        left = enclave_processes(state)
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    cleanup(container.dir, detached=True)
    if launcher_pid(state):
        remove_cgroups(state.get("cgroups", []), launcher_pid(state))
    if state.get("container_cgroups"):
        remove_groups(state["container_cgroups"])
    return 0


def remove_groups(groups: list[str], patience: float = 2.0) -> None:
    """Remove the container's own groups (those cove.oci.cgroups.make made) and what the enclave left below them.

    A killed container process stays a member until the engine reaps it,
    which it does at its own pace: a busy group is retried for `patience`
    seconds, then left (empty groups cost nothing but a name).
    """
    deadline = time.monotonic() + patience
    for group in groups:
        while True:
            for folder, _, _ in sorted(os.walk(group), key=lambda item: len(item[0]), reverse=True):
                try:
                    os.rmdir(folder)
                except OSError:
                    pass
            if not os.path.isdir(group) or time.monotonic() >= deadline:
                break
            time.sleep(0.01)


def remove_cgroups(parents: list[str], pid: int) -> None:
    """The empty groups a killed container process left (named cove-PID-… by cove.runtime.limits)."""
    for parent in parents:
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            if name.startswith(f"cove-{pid}-"):
                try:
                    os.rmdir(os.path.join(parent, name))
                except OSError:
                    pass


def kill_exact(pid: int, start: int | None) -> None:
    """kill_and_wait, only if pid is still the process that started at start (never a reused pid)."""
    found = start_time(pid)
    if found is not None and start is not None and found[0] == start and found[1] not in "ZX":
        kill_and_wait(pid, start)


def kill_and_wait(pid: int, start: int | None) -> None:
    try:
        os.kill(pid, SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(200):
        found = start_time(pid)
        if found is None or found[0] != start or found[1] in "ZX":
            return
        time.sleep(0.01)


def _unescape(text: str) -> str:
    """A /proc/self/mounts field: spaces, tabs, newlines and backslashes come as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        text = text.replace(code, chr(int(code[1:], 8)))
    return text


GONE = ".gone-"  # ROOT/.gone-ID-PID: a deleted container's folder on its way out (no id starts with a dot)
RETRY = "~"  # each later delete that retries a leftover .gone-* appends one
RETRIES = 3  # a .gone-* that this many retries could not remove is left for the operator
MNT_DETACH, UMOUNT_NOFOLLOW = 2, 8  # Linux's umount2 flags


def mounts_below(folder: str) -> list[str]:
    """The mount points at or below folder (absolute, resolved), deepest first; one per mount (stacked ones repeat)."""
    try:
        with open("/proc/self/mounts") as mounts:
            points = [_unescape(line.split()[1]) for line in mounts]
    except OSError:
        return []
    prefix = folder.rstrip("/") + "/"
    return sorted((p for p in points if p == folder or p.startswith(prefix)), reverse=True)


def unmount_below(folder: str) -> list[str]:
    """Detach every mount at or below folder (lazily: a busy one goes once let go); what stays mounted.

    Passes repeat while they make progress: a mount hidden under another one
    is reachable once the upper one is gone. A point is never followed as a
    symlink. ctypes loads only when something is mounted there.
    """
    left = mounts_below(folder)
    if not left:
        return left
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    while left:
        for point in left:
            libc.umount2(os.fsencode(point), MNT_DETACH | UMOUNT_NOFOLLOW)
        now = mounts_below(folder)
        if now == left:
            break
        left = now
    return left


def cleanup(folder: str, detached: bool = False) -> None:
    """Remove a container's folder and anything a killed launch left mounted below it.

    The parent is resolved first (the mount table names real paths: a
    --root through a symlink, such as /var/run, would match none), what is
    mounted below is detached, and if anything stays mounted nothing is
    renamed or removed (one line, exit 2): a killed launch may leave a
    plaintext view of an encrypted volume there, and no removal crosses into
    another file system. detached (`delete`): the folder is renamed out of
    the way at once and an `rm` nobody waits for removes it, with any a
    killed one left. Right after the enclave's exit each folder of the
    private root that its sandbox mounted on takes the kernel a grace period
    to let go of (2-8 ms per rmdir here, about 20 ms per container), which
    the engine would wait for.
    """
    parent, name = os.path.split(folder.rstrip("/"))
    parent = os.path.realpath(parent)
    folder = os.path.join(parent, name)
    left = unmount_below(folder)
    if left:
        raise error(
            f"{folder} still has {len(left)} mount(s) below it that cannot be unmounted, e.g. {left[-1][:200]!r}",
            "unmount them, then delete again",
        )
    if detached:
        gone = f"{GONE}{name}-{os.getpid()}"
        try:
            os.rename(folder, os.path.join(parent, gone))
        except OSError:
            pass
        else:
            _remove_detached(parent, gone)
            return
    remove_tree(folder)


def _remove_detached(parent: str, fresh: str) -> None:
    """`rm -rf --one-file-system` of fresh and the ROOT/.gone-* earlier removals left, in a grandchild of this
    process that holds none of the engine's pipes.

    A leftover is retried at most RETRIES times (each retry renames it with
    one more RETRY), and only once nothing is mounted below it, so a folder
    rm cannot remove is not attempted by every delete for ever.
    """
    names = [fresh]
    try:
        found = [n for n in os.listdir(parent) if n.startswith(GONE) and n != fresh]
    except OSError:
        found = []
    for name in found:
        if len(name) - len(name.rstrip(RETRY)) >= RETRIES or unmount_below(os.path.join(parent, name)):
            continue
        try:
            os.rename(os.path.join(parent, name), os.path.join(parent, name + RETRY))
        except OSError:
            continue  # another delete took it
        names.append(name + RETRY)
    child = os.fork()
    if child == 0:
        try:
            if os.fork() == 0:
                os.setsid()
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.closerange(3, 1 << 16)
                os.chdir(parent)  # relative names: its command line does not name the runtime's root
                os.execv("/bin/rm", ["rm", "-rf", "--one-file-system", "--", *names])
        except BaseException:
            pass
        os._exit(0)
    os.waitpid(child, 0)


def remove_tree(folder: str) -> None:
    """shutil.rmtree(folder, ignore_errors=True) without importing shutil, never leaving folder's file system."""
    if os.path.islink(folder):
        try:
            os.unlink(folder)
        except OSError:
            pass
        return
    try:
        device = os.lstat(folder).st_dev
    except OSError:
        return
    folders: list[str] = []  # parents before their children
    pending = [folder]
    while pending:
        where = pending.pop()
        folders.append(where)
        try:
            with os.scandir(where) as entries:
                for entry in entries:
                    try:
                        if not entry.is_dir(follow_symlinks=False):
                            os.unlink(entry.path)
                        elif entry.stat(follow_symlinks=False).st_dev == device:
                            pending.append(entry.path)
                    except OSError:
                        pass
        except OSError:
            pass
    for where in reversed(folders):
        try:
            os.rmdir(where)
        except OSError:
            pass


def cmd_features() -> int:
    import json

    from cove import __version__

    features = {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": SPEC_VERSION,
        "hooks": [],
        "mountOptions": [],
        "linux": {
            "namespaces": ["pid", "ipc", "uts", "mount", "network", "user", "cgroup"],
            "capabilities": [],
            "cgroup": {"v1": True, "v2": True, "systemd": False},
            "seccomp": {"enabled": True},
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
        },
        "annotations": {
            "io.github.cove.runtime.version": __version__,
            "cove.dev/unmeasured-debug": "accepted: run an unsigned image as an unmeasured debug enclave",
        },
    }
    print(json.dumps(features, indent=2))
    return 0


# -- the command line

GLOBAL_VALUES = frozenset({"--root", "--log", "--log-format", "--rootless", "--node-root"})
GLOBAL_FLAGS = frozenset({"--debug", "--systemd-cgroup"})
HOT = frozenset({"start", "state", "kill", "delete", "features"})
FAST = HOT | {"create"}  # create's usual options are parsed here too; cove.oci.create does the work
CREATE_VALUES = {
    "--bundle": "bundle",
    "-b": "bundle",
    "--pid-file": "pid_file",
    "--console-socket": "console_socket",
    "--preserve-fds": "preserve_fds",
}
CREATE_FLAGS = frozenset({"--no-pivot", "--no-new-keyring"})


class Options:
    """The global options (the full parser in cove.oci.commands knows them too)."""

    def __init__(self) -> None:
        self.root = DEFAULT_ROOT
        self.log: str | None = None
        self.log_format = "text"
        self.debug = False
        self.node_root: str | None = None


def _fast_parse(argv: list[str]) -> tuple[Options, str, list[str]] | None:
    """Globals, command and its arguments when the command is a hot one and every option is known; else None."""
    options = Options()
    index = 0
    while index < len(argv) and argv[index].startswith("-"):
        name, eq, value = argv[index].partition("=")
        if name in GLOBAL_FLAGS and not eq:
            options.debug = options.debug or name == "--debug"
            index += 1
            continue
        if name not in GLOBAL_VALUES:
            return None
        if not eq:
            if index + 1 >= len(argv):
                return None
            value = argv[index + 1]
            index += 1
        index += 1
        if name == "--root":
            options.root = value
        elif name == "--log":
            options.log = value
        elif name == "--log-format":
            if value not in ("text", "json"):
                return None
            options.log_format = value
        elif name == "--node-root":
            options.node_root = value
    if index >= len(argv) or argv[index] not in FAST:
        return None
    return options, argv[index], argv[index + 1 :]


def _run_hot(options: Options, command: str, rest: list[str]) -> int | None:
    """Run a hot command; None when its arguments need the full parser (which then explains)."""
    if command == "create":
        return _run_create(options, rest)
    flags = {a for a in rest if a.startswith("-")}
    words = [a for a in rest if not a.startswith("-")]
    if command == "features":
        return cmd_features() if not rest else None
    if command in ("start", "state"):
        if flags or len(words) != 1:
            return None
        return (cmd_start if command == "start" else cmd_state)(options.root, words[0])
    if command == "kill":
        if not flags <= {"--all", "-a"} or len(words) not in (1, 2):
            return None
        return cmd_kill(options.root, words[0], words[1] if len(words) == 2 else "SIGTERM", bool(flags))
    if command == "delete":
        if not flags <= {"--force", "-f"} or len(words) != 1:
            return None
        return cmd_delete(options.root, words[0], bool(flags))
    return None


def _run_create(options: Options, rest: list[str]) -> int | None:
    """`create [--bundle DIR] [--pid-file F] [--console-socket S] [--preserve-fds N] ID` (None: the full parser)."""
    given: dict[str, str] = {}
    words: list[str] = []
    index = 0
    while index < len(rest):
        name, eq, value = rest[index].partition("=")
        if name in CREATE_FLAGS and not eq:
            index += 1
            continue
        if name.startswith("-"):
            if name not in CREATE_VALUES:
                return None
            if not eq:
                if index + 1 >= len(rest):
                    return None
                value = rest[index + 1]
                index += 1
            given[CREATE_VALUES[name]] = value
        else:
            words.append(rest[index])
        index += 1
    if len(words) != 1 or not given.get("preserve_fds", "0").isdigit():
        return None
    if given.get("preserve_fds", "0") == "0":
        from cove.oci import resident  # built-in modules only: the verifier is loaded in the helper

        code = resident.create(
            options.root,
            words[0],
            given.get("bundle", "."),
            given.get("pid_file"),
            given.get("console_socket"),
            options.node_root,
            (options.log, options.log_format),
        )
        if code is not None:
            return code
    if options.node_root:
        os.environ["COVE_NODE_ROOT"] = options.node_root  # read by cove.oci.launch in the container's process
    from cove.oci import create

    return create.run(
        options.root,
        words[0],
        given.get("bundle", "."),
        given.get("pid_file"),
        given.get("console_socket"),
        int(given.get("preserve_fds", "0")),
    )


def log_error(path: str | None, log_format: str, line: str) -> None:
    """Append an error to --log (a JSON object per line with --log-format json, as containerd's shim reads)."""
    if not path:
        return
    try:
        with open(path, "a") as handle:
            if log_format == "json":
                import json

                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                handle.write(json.dumps({"level": "error", "msg": line, "time": stamp}) + "\n")
            else:
                handle.write(f"cove-runtime: error: {line}\n")
    except OSError:
        pass


def report(options: Options, failure: CoveError) -> int:
    """One line on stderr (and in --log); the error's exit code."""
    log_error(options.log, options.log_format, failure.line())
    print(f"cove-runtime: error: {failure.line()}", file=sys.stderr)
    return int(failure.exit_code)


def unexpected(options: Options, exc: Exception) -> int:
    """A bug or an input nobody foresaw: one line and exit 125, never a traceback (unless --debug)."""
    from cove.errors import ExitCode

    if options.debug:
        raise exc
    found = error(
        f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}",
        "run again with --debug for the traceback, and report it",
    )
    found.exit_code = ExitCode.SANDBOX
    return report(options, found)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parsed = _fast_parse(argv)
    if parsed is not None:
        options, command, rest = parsed
        try:
            code = _run_hot(options, command, rest)
        except KeyboardInterrupt:
            return 130  # ExitCode.INTERRUPTED
        except Exception as exc:  # cove.errors only now: the hot commands' usual path never loads it
            from cove.errors import CoveError, file_system_error

            if isinstance(exc, CoveError):
                return report(options, exc)
            if isinstance(exc, OSError):
                return report(options, file_system_error(exc))
            return unexpected(options, exc)  # the engine reads one line, never a traceback
        if code is not None:
            return code
    from cove.oci import commands

    return commands.main(argv)


def run_main() -> None:
    """The console script: main's exit code, without the interpreter's teardown.

    Python's own exit runs a garbage collection over everything loaded and
    tears every module down: about 12 ms of CPU after `create` (which holds
    the verifier, cryptography included), 1 ms after a hot command, all on
    the engine's path. Every file the runtime writes is closed before main
    returns; the standard streams are flushed here.
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code & 0xFF)
