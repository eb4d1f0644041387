"""`cove daemon`: the node's API over a unix socket (HTTP/1.1, JSON), run in the foreground.

The socket is mode 0660, owned by root and the ``cove`` group; each request
is checked again by the peer's credentials (SO_PEERCRED), so only root and
members of that group are served. Enclaves are started through supervisors
(cove.daemon.supervisor) that the daemon does not keep as children: killing
the daemon stops no enclave, and a new daemon reads their folders again
(cove.daemon.registry). Every line the daemon logs is a JSON object on
stderr. The routes are listed in :mod:`cove.daemon.openapi` and
docs/formats/daemon-api.md.
"""

from __future__ import annotations

import errno
import grp
import http.server
import io
import json
import os
import re
import select
import signal
import socket
import socketserver
import stat
import struct
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from cove import __version__, trace
from cove.daemon import attestation
from cove.daemon import client as client_mod
from cove.daemon import execstream, logfile
from cove.daemon import openapi
from cove.daemon.events import Event, Events, watch
from cove.daemon.imports import ImportCache
from cove.daemon.execsession import Helper, Session, buffered
from cove.daemon.problems import Problem, from_cove_error
from cove.daemon.registry import ConflictError, Enclave, Registry, owns
from cove.runtime.procfs import children, process_start, sandbox_init

from cove.config import Config, host_paths
from cove.daemon.supervisor import parse_restart
from cove.decode import decode_json
from cove.errors import CoveError, ExitCode, NotFoundError
from cove.util import die_with_parent
from cove.image.store import ImageStore

if TYPE_CHECKING:
    from cove.daemon.metrics import Metrics

DEFAULT_ROOT = "/var/lib/cove"
MAX_BODY = 1 << 20
EXEC_KEEP = (16 << 20, 1 << 20)  # the most of stdout and of stderr an exec without a stream keeps
EXEC_TIMEOUT, EXEC_TIMEOUT_MAX = 300.0, 86400.0  # seconds an exec without a stream may run

START_TIMEOUT = 30.0
READ_TIMEOUT = 30.0  # seconds for a request's line, headers and body to arrive (COVE_DAEMON_READ_TIMEOUT)
MAX_CONNECTIONS = 256  # open connections per uid other than root (COVE_DAEMON_MAX_CONNECTIONS)
MAX_ENCLAVES = 128  # enclaves not yet ended per uid other than root (COVE_DAEMON_MAX_ENCLAVES)
RECOVER_GRACE = 2.0
JSON = dict[str, Any]
JSONList = list[dict[str, Any]]
FORWARDED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2}


def log(event: str, level: str = "info", **fields: Any) -> None:
    """One structured line on stderr."""
    line = json.dumps({"ts": round(time.time(), 3), "level": level, "event": event, **fields}, default=str)
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _die_with_parent() -> None:
    die_with_parent(signal.SIGKILL)  # the spawner ends with the daemon


def parse_signal(value: Any) -> int:
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        number = int(value)
        if 1 <= number < signal.NSIG:
            return number
    elif isinstance(value, str):
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        found = getattr(signal.Signals, name, None) if name.isidentifier() else None
        if isinstance(found, signal.Signals):
            return int(found)
    raise Problem("InvalidRequest", f"unknown signal {value!r}")


class Daemon:
    """The node service's state: store, registry, events; the API handler calls into it."""

    def __init__(
        self,
        root: Path,
        socket_path: str,
        group: str = client_mod.GROUP,
        log_max_bytes: int = logfile.DEFAULT_MAX_BYTES,
        log_files: int = logfile.DEFAULT_FILES,
    ):
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.store = ImageStore(self.root / "store")
        self.imports = ImportCache(self.store)  # a run of an unchanged build skips the import's checks
        self.registry = Registry(self.root)
        self.socket_path = socket_path
        try:
            self.gid: int | None = grp.getgrnam(group).gr_gid
        except KeyError:
            self.gid = None
            log("no_group", level="warning", group=group, detail="only root may use the daemon")
        self.group = group
        self.log_max_bytes, self.log_files = log_max_bytes, log_files  # rotation of the enclaves' logs
        self.max_enclaves = MAX_ENCLAVES  # per uid other than root (serve sets it from the environment)
        self.events = Events(self.root / "events.jsonl")  # a bounded journal: events outlive the daemon
        self.lock = threading.Lock()
        self.metrics: Metrics | None = None  # when --metrics is given

    # -- start-up

    def recover(self) -> None:
        """Find the enclaves of a previous daemon: keep the living, settle the dead, drop half-made ones."""
        # a supervisor writes its state first thing; a record still without one after a grace period
        # was registered by a daemon that died before its supervisor was forked
        while any(
            not e.state and time.time() - e.record.get("created", 0) < RECOVER_GRACE for e in self.registry.all()
        ):
            time.sleep(0.05)
        removed = self.registry.recover()
        blobs, freed = self.store.collect()  # an import cut short leaves only tmp/ and unlinked blobs
        attestation.ensure_server(self.root)  # one /dev/attestation server for the node, kept across restarts
        running = [e.id for e in self.registry.all() if not e.ended]
        log("recovered", running=len(running), removed_half_made=len(removed), blobs_collected=blobs, bytes_freed=freed)

    # -- access

    def authorize(self, connection: socket.socket, uid: int, gid: int) -> None:
        """Root, or a member of the group: the groups the peer had when it connected (SO_PEERGROUPS)."""
        if uid == 0:
            return
        if self.gid is None or (self.gid != gid and self.gid not in peer_groups(connection)):
            raise Problem("Forbidden", f"uid {uid} is neither root nor in the `{self.group}` group", ExitCode.REFUSED)

    # -- enclaves

    def create(self, body: JSON, uid: int, attached: bool = False) -> JSON:
        try:
            return self._create(body, uid, attached)
        except (Problem, CoveError) as exc:
            if self.metrics is not None:
                kind = exc.kind if isinstance(exc, Problem) else type(exc).__name__
                self.metrics.failures.labels(kind).inc()
            raise

    def _create(self, body: JSON, uid: int, attached: bool) -> JSON:
        instance = Path(_field(body, "instance", str))
        program = _field(body, "program", str)
        args = _field(body, "args", list, [])
        if not all(isinstance(a, str) for a in args):
            raise Problem("InvalidRequest", "args must be a list of strings")
        name = _field(body, "name", str, None)
        backend = _field(body, "backend", str, None)
        restart = _field(body, "restart", str, "no")
        env = _field(body, "env", dict, {})
        signer_hex = _field(body, "signer", str, None)
        parse_restart(restart)
        if backend not in (None, "auto", "sim"):
            raise Problem(
                "Unprocessable",
                f"the node runs sim enclaves, not backend {backend!r}: run it without the daemon (COVE_NO_DAEMON=1)",
            )
        if not instance.is_absolute():
            raise Problem("InvalidRequest", "instance must be an absolute path")
        _check_path(instance)
        if signer_hex is not None and not re.fullmatch("[0-9a-fA-F]{64}", signer_hex):
            raise Problem("InvalidRequest", "signer must be 64 hex digits")
        _check_owner(instance, uid)  # first: a member learns nothing of what lies in folders not its own
        try:
            found = (instance / "cove.toml").is_file()
        except OSError as exc:
            raise Problem("InvalidRequest", f"instance {instance}: {exc.strerror}") from None
        if not found:
            raise NotFoundError(f"no Cove instance in {instance} (no cove.toml)", "run `cove new NAME`, or give -C DIR")
        signer = bytes.fromhex(signer_hex) if signer_hex else None
        started = time.monotonic()
        try:
            with trace.span("daemon.import"):  # an unchanged build: its files looked at, not read
                image, new = self.imports.import_instance(instance, signer, None if uid == 0 else uid)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise Problem(
                    "InsufficientStorage",
                    f"the image store {self.store.path} is full: {exc.strerror}",
                    ExitCode.FILE_SYSTEM,
                ) from None
            raise
        if uid not in image.users:  # an unchanged build the import cache answered: this run claims the image too
            image = self.store.claim(image.id, uid)
        if new:
            log(
                "image_imported",
                image=image.id,
                files=image.files,
                bytes=image.bytes,
                seconds=round(time.monotonic() - started, 3),
            )
            self.events.emit("image", "import", image.id, name=image.name)
        config = self.imports.verified(image).config
        if uid != 0:
            _refuse_host_paths(config, uid)
            running = sum(1 for e in self.registry.all() if e.record.get("uid") == uid and not e.ended)
            if running >= self.max_enclaves:  # each is a supervisor, a sandbox and its cgroups on the node
                raise Problem(
                    "TooManyEnclaves",
                    f"uid {uid} already runs {running} enclaves, the most the daemon allows a user other than "
                    "root (COVE_DAEMON_MAX_ENCLAVES): stop or remove some",
                    ExitCode.REFUSED,
                )
        allowed = set(config.env.passthrough)
        passthrough = {k: v for k, v in env.items() if k in allowed and isinstance(v, str)}
        # root's enclaves keep their state in instance/run, as `cove run` does; another user's folder is
        # never written by root (a symbolic link there could point anywhere): its state stays in the node
        state_dir = str(instance / "run") if uid == 0 else None
        record = {
            "name": name,
            "image": image.id,
            "measurement": image.measurement,
            "signer": image.signer,
            "backend": "vm" if config.enclave.backend == "vm" else "sim",  # the supervisor launches with it
            "program": program,
            "args": args,
            "instance": str(instance),
            "state_dir": state_dir,
            "restart": restart,
            "env": passthrough,
            "uid": uid,
            "log_max_bytes": self.log_max_bytes,
            "log_files": self.log_files,
            "attached": attached,  # `cove run` follows it to its end and removes it: its end is not fsynced
        }
        with trace.span("daemon.register"):
            enclave = self.registry.create(record)
            self.events.emit("enclave", "create", enclave.id, name=enclave.name, uid=enclave.record.get("uid"))
        try:
            with trace.span("daemon.spawn"):  # until the supervisor has written its first state
                self.spawn(enclave)
        except BaseException:
            self.registry.remove(enclave)
            raise
        enclave = self.registry.load(enclave.id)
        log(
            "enclave_started",
            id=enclave.id,
            name=enclave.name,
            uid=enclave.record.get("uid"),
            image=image.id,
            seconds=round(time.monotonic() - started, 3),
        )
        if self.metrics is not None:
            self.metrics.starts.labels(record["backend"]).inc()
            self.metrics.latency.observe(time.monotonic() - started)
        self.events.emit("enclave", "start", enclave.id, name=enclave.name, uid=enclave.record.get("uid"))
        self.events.last_seen.setdefault(enclave.id, ("running", 0))
        return enclave.view()

    def _spawner(self) -> subprocess.Popen[bytes]:
        """The pre-loaded process that forks supervisors (cove.daemon.spawner), started again if it died."""
        spawner = getattr(self, "spawner_process", None)
        if spawner is None or spawner.poll() is not None:
            spawner = subprocess.Popen(
                [sys.executable, "-m", "cove.daemon.spawner"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                close_fds=True,
                preexec_fn=_die_with_parent,
            )
            self.spawner_process = spawner
        return spawner

    def spawn(self, enclave: Enclave) -> None:
        """Have a supervisor forked for the enclave, and wait until it has written its state."""
        with self.lock:
            spawner = self._spawner()
            line = f"{enclave.folder}\t{self.store.path}\n".encode()
            try:
                _send_line(spawner, line)
            except BrokenPipeError:
                spawner.kill()
                _send_line(self._spawner(), line)
        deadline = time.monotonic() + START_TIMEOUT
        while not (enclave.folder / "state.json").exists():
            if time.monotonic() > deadline:
                raise Problem("Internal", "the enclave's supervisor did not start", ExitCode.SANDBOX)
            time.sleep(0.001)  # a forked supervisor writes it within milliseconds

    def find(self, ref: str, uid: int) -> Enclave:
        """The enclave ref names, if uid may act on it (root, or the uid that started it): else not found."""
        return self.registry.find(ref, uid)

    def visible_to(self, uid: int) -> Callable[[Event], bool]:
        """Which events a member of the group sees: those of the enclaves it started (each carries its uid)."""

        def visible(event: Event) -> bool:
            return event.get("type") == "enclave" and event.get("uid") == uid

        return visible

    def view(self, ref: str, uid: int) -> JSON:
        return self.registry.settle(self.find(ref, uid)).view()

    def list(self, all_: bool, uid: int) -> JSONList:
        out = []
        for enclave in self.registry.all():
            if not owns(enclave, uid):
                continue
            enclave = self.registry.settle(enclave)
            if all_ or not enclave.ended:
                out.append(enclave.view())
        return out

    def signal(self, ref: str, signum: int, uid: int) -> JSON:
        enclave = self.registry.settle(self.find(ref, uid))
        if enclave.ended:
            raise ConflictError(f"enclave {enclave.name} is not running")
        self._deliver(enclave, signum)
        self.events.emit("enclave", "kill", enclave.id, name=enclave.name, uid=enclave.record.get("uid"), signal=signum)
        return self.registry.load(enclave.id).view()

    def _deliver(self, enclave: Enclave, signum: int, patience: float = 5.0) -> None:
        """Signal the program's process group, as `cove run` forwards a signal (SIGKILL: the whole sandbox).

        An enclave still starting has no program yet: wait for it (a signal sent to the supervisor
        before its launcher forwards signals would be lost), up to ``patience`` seconds.
        """
        pid = enclave.state.get("pid")
        deadline = time.monotonic() + patience
        while True:
            init = sandbox_init(pid) if pid else None
            program = children(init) if init else []
            if program or not enclave.supervisor_alive() or time.monotonic() >= deadline:
                break
            current = self.registry.load(enclave.id)
            if current.ended:
                return
            time.sleep(0.01)
        if init is not None and signum == signal.SIGKILL:
            _kill(init, signal.SIGKILL)  # the sandbox's pid 1: everything in its pid namespace goes
        elif program:
            try:
                os.killpg(os.getpgid(program[0]), signum)
            except (ProcessLookupError, PermissionError):
                pass
        elif signum in FORWARDED or signum == signal.SIGKILL:
            _kill(pid, signum)  # no sandbox (yet): the supervisor stops before launching, or forwards it

    def exec_helper(self, ref: str, body: JSON, uid: int, stream: bool = False) -> tuple[Enclave, str, Helper]:
        """Check an exec request and start its helper (cove.daemon.execin) in the running enclave.

        The helper gets the enclave's environment, and the names of the ``env:`` secrets whose values it
        reads from the program's own initial environment: the daemon never holds or logs them.
        """
        from cove.runtime import launcher, seccomp, vm

        argv = _field(body, "argv", list)
        if (
            not argv
            or not all(isinstance(a, str) and "\0" not in a and len(a) <= 65536 for a in argv)
            or len(argv) > 4096
        ):
            raise Problem("InvalidRequest", "argv must be a non-empty list of strings")
        tty = _field(body, "tty", bool, False) if stream else False
        stdin = _field(body, "stdin", bool, False) if stream else False
        rows, cols = (_field(body, key, int, default) for key, default in (("rows", 24), ("cols", 80)))
        if not (0 <= rows <= 0xFFFF and 0 <= cols <= 0xFFFF):
            raise Problem("InvalidRequest", "rows and cols must be between 0 and 65535")
        enclave = self.registry.settle(self.find(ref, uid))
        supervisor = int(enclave.state["pid"]) if enclave.state.get("pid") else None
        vm_socket = vm.exec_socket(supervisor) if supervisor and enclave.status == "running" else None
        init = sandbox_init(supervisor) if supervisor else None
        program = children(init) if init else []
        start = process_start(program[0]) if program else None
        if start is not None and init is not None and program[0] not in children(init):
            start = None  # it ended between the two looks: its pid may be another process's now
        if enclave.status != "running" or (vm_socket is None and (not program or start is None)):
            raise ConflictError(f"enclave {enclave.name} is not running", "start it with `cove run -d`")
        image = self.store.get(enclave.record["image"])
        config = self.imports.verified(image).config  # checked once per image, not at every exec
        path = os.path.normpath(argv[0])
        if not config.enclave.debug and not launcher.allowed(path, config.process.entry_points):
            raise Problem(
                "Forbidden",
                f"{path} is not an entry point of this enclave (allowed: "
                f"{', '.join(config.process.entry_points)}; any program only in a debug enclave)",
                ExitCode.USAGE,
            )
        if vm_socket is not None and supervisor is not None:  # its launcher relays it to the guest's init
            relayed = {"socket": str(vm_socket), "argv": [path, *argv[1:]], "stdin": stdin, "tty": tty}
            relayed.update(rows=rows, cols=cols)
            return enclave, path, Helper(supervisor, relayed, stdin, "cove.runtime.vm_exec")
        uid, gid = launcher.resolve_user(config.process.user, image.root)
        spec = {
            "argv": [path, *argv[1:]],
            "uid": uid,
            "gid": gid,
            "cwd": config.process.cwd,
            "start": start,
            "env": launcher.build_environment(config, enclave.record.get("env", {})),
            "secret_env": [s.where for s in config.secrets if s.kind == "env"],
            "max_open_files": config.resources.max_open_files,
            "tty": tty,
            "rows": rows,
            "cols": cols,
            "seccomp": seccomp.enclave_filter(config).hex(),
        }

        return enclave, path, Helper(program[0], spec, stdin)

    def exec_ended(self, enclave: Enclave, program: str, exit_code: int | None) -> None:
        """The exec event of a buffered or streamed exec; no exit code means the client left first."""
        self.events.emit(
            "enclave",
            "exec",
            enclave.id,
            name=enclave.name,
            uid=enclave.record.get("uid"),
            program=program,
            exit_code=exit_code,
            client_left=exit_code is None,
        )

    def exec(self, ref: str, body: JSON, uid: int, client: socket.socket | None = None) -> JSON | None:
        """Run a program in a running enclave; its exit code and output once it ends (no stream).

        The outputs kept are bounded (EXEC_KEEP), the program is killed after ``timeout`` seconds
        (default EXEC_TIMEOUT), and when the client leaves first: None, there is no one to answer.
        """
        raw = body.get("timeout")
        timeout = _number(EXEC_TIMEOUT if raw is None else "bad" if isinstance(raw, bool) else raw, "timeout")
        if not 0 < timeout <= EXEC_TIMEOUT_MAX:
            raise Problem("InvalidRequest", f"timeout must be more than 0 and at most {EXEC_TIMEOUT_MAX:g} seconds")
        enclave, path, helper = self.exec_helper(ref, body, uid)
        answer = buffered(helper, EXEC_KEEP, timeout, client)
        self.exec_ended(enclave, path, None if answer is None else answer["exit_code"])
        return answer

    def stop(self, ref: str, timeout: float, uid: int) -> JSON:
        enclave = self.registry.settle(self.find(ref, uid))
        (enclave.folder / "stop").touch()
        if not enclave.ended:
            self._deliver(enclave, signal.SIGTERM)
            if not self._wait_end(enclave, timeout):
                self._deliver(self.registry.load(enclave.id), signal.SIGKILL)
                if not self._wait_end(enclave, 10):
                    _kill(enclave.state.get("pid"), signal.SIGKILL)
                    self._wait_end(enclave, 5)
        enclave = self.registry.settle(self.registry.load(enclave.id))
        self.events.emit(
            "enclave",
            "stop",
            enclave.id,
            name=enclave.name,
            uid=enclave.record.get("uid"),
            exit_code=enclave.state.get("exit_code"),
        )
        return enclave.view()

    def _wait_end(self, enclave: Enclave, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.002
        while True:
            current = self._current(enclave.id)
            if current.ended and not current.supervisor_alive():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _current(self, ident: str) -> Enclave:
        """The enclave as its files say now, settled (Registry.settle reads the state again once the
        supervisor is seen dead, so an end written just before its exit is not taken for a kill)."""
        return self.registry.settle(self.registry.load(ident))

    def wait(self, ref: str, uid: int) -> JSON:
        enclave = self.find(ref, uid)
        self._wait_end(enclave, None)
        return self.registry.load(enclave.id).view()

    def remove(self, ref: str, force: bool, uid: int) -> JSON:
        view, doomed = self._unlist(ref, force, uid)
        self.registry.purge(doomed)
        return view

    def _unlist(self, ref: str, force: bool, uid: int) -> tuple[JSON, Path]:
        """`cove rm` but for the deletion of the enclave's folder, already renamed out of the registry:
        its last view and where the folder now is (Registry.purge deletes it)."""
        enclave = self.registry.settle(self.find(ref, uid))
        if not enclave.ended:
            if not force:
                raise ConflictError(f"enclave {enclave.name} is {enclave.status}", "stop it first, or use `cove rm -f`")
            self.stop(enclave.id, 0, uid)
        view = self.registry.load(enclave.id).view()
        doomed = self.registry.remove(enclave, purge=False)
        self.events.emit("enclave", "remove", enclave.id, name=enclave.name, uid=enclave.record.get("uid"))
        return view, doomed

    def logs(
        self,
        ref: str,
        follow: bool,
        tail: int | None,
        uid: int,
        pause: Callable[[float], object] = time.sleep,
        running: Callable[[], bool] | None = None,
    ) -> Generator[bytes, None, None]:
        """The log's bytes (the last ``tail`` lines), then, with follow, what is appended until the end.

        Rotated files come first, oldest first; a follower whose file is rotated away drains it and goes
        on in the next newer one (cove.daemon.logfile), so it loses no line across a rotation. A follower
        waits with ``pause`` (an attached run's wakes up as soon as the supervisor exits); while
        ``running`` says its supervisor surely runs (an attached run's pidfd), it does not read the
        enclave's record and state to see whether it ended: its CPU is the start's on two cores.
        """
        enclave = self.find(ref, uid)
        files = int(enclave.record.get("log_files") or 1) if enclave.record.get("log_max_bytes") else 1
        delay = 0.002  # short waits first (a short-lived enclave ends soon), longer ones later
        began = time.monotonic()  # `cove run` follows from the start: it sees the end within 10 ms for 5 s
        handle: BinaryIO = logfile.open_live(enclave.log, files)

        try:
            if tail is not None:
                yield logfile.tail(enclave.log, files, tail)
                handle.seek(0, os.SEEK_END)
            else:
                yield from logfile.older(handle, enclave.log, files)
            ended = False
            while True:
                chunk = handle.read(65536)
                if chunk:
                    delay = 0.002
                    yield chunk
                    continue
                following = logfile.newer(handle, enclave.log, files)
                if following is not None:
                    rest = handle.read()  # written before the rename: nothing follows it in this file
                    if rest:
                        yield rest
                    handle.close()
                    handle = following
                    continue
                if not follow or ended:
                    return
                if running is None or not running():
                    current = self._current(enclave.id)
                    if current.ended and not current.supervisor_alive():
                        ended = True  # one more look: the last bytes, in this file or a newer one
                        continue
                pause(delay)
                delay = min(delay * 2, 0.01 if time.monotonic() - began < 5 else 0.1)
        finally:
            handle.close()

    def attach(self, view: JSON, uid: int, client: socket.socket | None = None) -> Generator[bytes, None, None]:
        """`cove run` attached (cove-attach/1): the started enclave, its log as it grows, and once it has
        ended the enclave as it ended, removed first, as `docker run --rm` does (one request in place of
        create, logs, wait and remove). A client that leaves stops the stream, not the enclave: its hang-up
        on CLIENT raises ClientLeft even while the program is silent, never after the removal."""
        ident = view["id"]
        yield client_mod.attach_frame(client_mod.STARTED, json.dumps(view).encode())
        waker = _ExitWaker.of(self.registry.load(ident), client)
        try:
            for chunk in self.logs(ident, True, None, uid, waker.pause, waker.running):
                for start in range(0, len(chunk), execstream.CHUNK):
                    yield client_mod.attach_frame(client_mod.OUTPUT, chunk[start : start + execstream.CHUNK])
            waker.pause(0)  # one that hung up as the program ended: the enclave stays listed too
        finally:
            waker.close()
        ended, doomed = self._unlist(ident, False, uid)
        try:
            yield client_mod.attach_frame(client_mod.ENDED, json.dumps(ended).encode())
        finally:  # the client has its end before the folder's deletion (a kill between: recover() deletes it)
            self.registry.purge(doomed)

    # -- images

    def images(self, uid: int = 0) -> JSONList:
        """Root sees every image; another user only those it imported or ran, and counts only its enclaves."""
        used: dict[str, int] = {}
        for enclave in self.registry.all():
            if owns(enclave, uid):
                used[enclave.record["image"]] = used.get(enclave.record["image"], 0) + 1
        return [
            dict(image.summary(), enclaves=used.get(image.id, 0))
            for image in self.store.list()
            if uid == 0 or uid in image.users
        ]

    def remove_image(self, ident: str, force: bool, uid: int = 0) -> JSON:
        """Root removes the image; another user drops its own claim, and the image goes with the last claim."""
        if force and uid != 0:
            raise Problem("Forbidden", "only root may remove an image by force", ExitCode.REFUSED)
        image = self.store.get(ident)
        if uid != 0 and uid not in image.users:
            raise NotFoundError(f"no image {ident!r} in the store", "`cove images` lists them")
        users = [e for e in self.registry.all() if e.record["image"] == image.id]
        mine = [e for e in users if owns(e, uid)]
        if mine and not force:
            raise ConflictError(
                f"image {image.id[:12]} is used by {len(mine)} enclave(s) ({', '.join(e.name for e in mine[:3])})",
                "remove them with `cove rm` first",
            )
        if any(not self.registry.settle(e).ended for e in mine):
            raise ConflictError(f"image {image.id[:12]} is used by a running enclave", "stop it first")
        if uid == 0:
            self.store.remove(image.id)
        elif not self.store.release(image.id, uid, keep=len(mine) < len(users))[1]:
            return {"id": image.id, "blobs_removed": 0, "bytes_freed": 0}  # others use it: only the claim went
        self.imports.forget(image.id)
        blobs, freed = self.store.collect()
        self.events.emit("image", "remove", image.id, name=image.name)
        return {"id": image.id, "blobs_removed": blobs, "bytes_freed": freed}

    def prune(self, uid: int = 0) -> JSON:
        if uid != 0:
            raise Problem("Forbidden", "only root may prune the image store", ExitCode.REFUSED)
        blobs, freed = self.store.collect()
        return {"blobs_removed": blobs, "bytes_freed": freed}


class ClientLeft(Exception):
    """An attached client hung up: its stream stops, and its enclave runs on and stays listed."""


class _ExitWaker:
    """A wait that ends early when the enclave's supervisor exits (a pidfd), so an attached run sees
    its end at once instead of at the follower's next look; a plain sleep when no pidfd can be had.
    With the attached client's socket it raises ClientLeft once the client has hung up (POLLHUP: its
    socket closed, not only its sending side), which the stream's writes would only see at the next
    output, or after the enclave was removed."""

    def __init__(self, fd: int | None, client: socket.socket | None = None) -> None:
        self.fd = fd
        self.client = client.fileno() if client is not None else None
        self.poller = select.poll()
        self.exit = select.poll()  # the pidfd alone: readable once the supervisor has exited
        if fd is not None:
            self.poller.register(fd, select.POLLIN)
            self.exit.register(fd, select.POLLIN)
        if self.client is not None:
            self.poller.register(self.client, 0)  # only its hang-up or an error: what it sends is not read here

    @classmethod
    def of(cls, enclave: Enclave, client: socket.socket | None = None) -> _ExitWaker:
        pid = enclave.state.get("pid")
        try:
            fd = os.pidfd_open(int(pid)) if pid else None
        except (OSError, ValueError, TypeError):
            return cls(None, client)
        if fd is not None and not enclave.supervisor_alive():  # opened after it ended: the pid may be another's
            os.close(fd)
            return cls(None, client)
        return cls(fd, client)

    def pause(self, seconds: float) -> None:
        if self.fd is None and self.client is None:
            time.sleep(seconds)
            return
        for fd, events in self.poller.poll(seconds * 1000):
            if fd == self.client and events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                raise ClientLeft

    def running(self) -> bool:
        """Whether the supervisor surely runs: it has a pidfd that has not become readable (False when
        there is no pidfd: the caller then looks at the enclave's state, as without this)."""
        return self.fd is not None and not self.exit.poll(0)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _invalid_body(message: str) -> Problem:
    return Problem("InvalidRequest", message)


def _field(body: JSON, name: str, kind: type, default: Any = ...) -> Any:
    if name not in body or body[name] is None:
        if default is ...:
            raise Problem("InvalidRequest", f"{name} is required")
        return default
    value = body[name]
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise Problem("InvalidRequest", f"{name} must be a {kind.__name__}")
    if isinstance(value, str) and ("\0" in value or len(value) > 4096):
        raise Problem("InvalidRequest", f"{name} is not an acceptable string")
    return value


def _refuse_host_paths(config: Config, uid: int) -> None:
    """The supervisor runs a member's enclave as root: a host path in its cove.toml (a host mount's source, a
    key file, a CA file) would be opened with root's rights, not the member's. Refused; `cove run` then
    runs the instance directly, as the member (cove.cli.attached)."""
    named = host_paths(config)
    if named:
        raise Problem(
            "HostPaths",
            f"the daemon runs enclaves as root, so an instance of uid {uid} may not name host paths "
            f"({'; '.join(named)}): run it without the daemon (COVE_NO_DAEMON=1)",
            ExitCode.USAGE,
        )


def _check_path(instance: Path) -> None:
    """An instance path the kernel can take: no component over NAME_MAX, nothing that is not a file name."""
    try:
        parts = [os.fsencode(part) for part in instance.parts]
    except UnicodeError:
        raise Problem("InvalidRequest", "instance is not a valid file name") from None
    if any(len(part) > 255 for part in parts):
        raise Problem("InvalidRequest", "instance has a path component longer than 255 bytes")


def _check_owner(instance: Path, uid: int) -> None:
    """A user other than root may only start an instance whose folders are its own. Made before anything
    else is looked at, and every way of failing it is the same answer, so that a member learns nothing of
    what exists in folders it cannot read (a missing path and another's cove.toml look alike)."""
    if uid == 0:
        return
    for path in (instance, instance / "image", instance / "build", instance / "cove.toml"):
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        # a link's owner is the link's: the store opens nothing through a link for a user
        if st is None or st.st_uid != uid or stat.S_ISLNK(st.st_mode):
            raise Problem(
                "Forbidden",
                f"{instance} is missing or does not belong to uid {uid}: the instance folder, its image/, build/ "
                "and cove.toml must be that user's own, and none a symbolic link",
                ExitCode.REFUSED,
            )


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13; Python names it from 3.?, not always


def peer_groups(connection: socket.socket) -> set[int]:
    """The supplementary groups of the peer, as the kernel saved them at connect() (no /proc, no pid)."""
    size = 4 * 256
    while True:
        try:
            data = connection.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
            break
        except OSError as exc:
            if exc.errno != errno.ERANGE or size >= 4 * 65536:
                return set()
            size = 4 * 65536  # NGROUPS_MAX
    count = len(data) // 4
    return set(struct.unpack(f"{count}I", data[: count * 4]))


def _send_line(process: subprocess.Popen[bytes], line: bytes) -> None:
    assert process.stdin is not None  # started with stdin=PIPE
    process.stdin.write(line)
    process.stdin.flush()


def _kill(pid: int | None, signum: int) -> None:
    if pid:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


class _Deadline(io.RawIOBase):
    """The socket under a handler's rfile: while a request is read, every read waits only until ``limit``
    seconds after that request's first read, so a client that sends a byte now and then is cut off as
    surely as one that stops (a timeout per read alone would let it hold a thread for good)."""

    def __init__(self, raw: Any, connection: socket.socket, limit: float) -> None:
        super().__init__()
        self.raw, self.connection, self.limit = raw, connection, limit
        self.deadline: float | None = None
        self.armed = True

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        if self.armed:
            now = time.monotonic()
            if self.deadline is None:
                self.deadline = now + self.limit
            if now >= self.deadline:
                raise TimeoutError("the request did not arrive in time")
            self.connection.settimeout(self.deadline - now)
        return int(self.raw.readinto(buffer))

    def start(self) -> None:
        """The next request: its own deadline, from its first read."""
        self.deadline, self.armed = None, True

    def stop(self) -> None:
        """The request is read: no deadline and no timeout (waits, streams and exec sessions have their own ends)."""
        self.armed = False
        self.connection.settimeout(None)

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
        super().close()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"cove-daemon/{__version__}"
    daemon: Daemon  # set on the class by serve()
    # a client that takes longer to send its request line, headers and body is disconnected (a thread
    # each would otherwise be held for good); lifted once the request is read (streams, waits)
    timeout = READ_TIMEOUT

    def setup(self) -> None:
        super().setup()
        self.reading = _Deadline(self.rfile.detach(), self.connection, self.timeout)
        self.rfile = io.BufferedReader(self.reading)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        return  # requests are logged as JSON in _handle

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a bad request line, headers too long) as problem documents too."""
        self.request_version = "HTTP/1.1"  # headers even for a request that looked like HTTP/0.9
        kind = {
            400: "InvalidRequest",
            404: "NotFound",
            405: "MethodNotAllowed",
            413: "TooLarge",
            414: "TooLarge",
            431: "TooLarge",
        }.get(code, "InvalidRequest")
        problem = Problem(kind, message or explain)
        problem.status = code if 400 <= code < 500 else problem.status
        self.close_connection = True
        try:
            self._json(problem.status, problem.document(), "application/problem+json")
        except OSError:
            pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def _handle(self, method: str) -> None:
        started = time.monotonic()
        status = 500
        try:
            pid, uid, gid = struct.unpack(
                "3i", self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            )
            self.peer_uid = uid
            self.daemon.authorize(self.request, uid, gid)

            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            status = self._route(method, url.path, query)
        except Problem as problem:
            status = self._problem(problem)
        except CoveError as exc:
            status = self._problem(from_cove_error(exc))
        except (BrokenPipeError, ConnectionResetError):
            status = 499
        except TimeoutError:  # the body stalled: no answer, the connection is closed
            self.close_connection = True
            status = 408
        except Exception as exc:  # noqa: BLE001 - a fault is logged, answered 500, and the daemon goes on
            log("fault", level="error", error=repr(exc), trace=traceback.format_exc(limit=8))
            status = self._problem(Problem("Internal", None, ExitCode.SANDBOX))
        finally:
            if not self.close_connection:  # the next request on this connection has a deadline again
                self.reading.start()
            log(
                "request",
                method=method,
                path=self.path[:200],
                status=status,
                ms=round((time.monotonic() - started) * 1000, 2),
                uid=getattr(self, "peer_uid", None),
            )

    def _body(self) -> JSON:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            raise Problem("InvalidRequest", "send the body with a Content-Length")
        if length is None:
            return {}
        if not length.isdigit():
            raise Problem("InvalidRequest", "Content-Length is not a number")
        if int(length) > MAX_BODY:
            raise Problem("TooLarge", f"the body is {length} bytes; the limit is {MAX_BODY}")
        data = self.rfile.read(int(length))
        if not data:
            return {}
        kind = (self.headers.get("Content-Type") or "application/json").split(";")[0].strip()
        if kind != "application/json":
            raise Problem("UnsupportedMediaType", f"Content-Type {kind} is not application/json")
        body = decode_json(data, _invalid_body, "the body", limit=MAX_BODY)  # nested too deep too: a 400
        if not isinstance(body, dict):
            raise Problem("InvalidRequest", "the body must be a JSON object")
        return body

    def _route(self, method: str, path: str, query: dict[str, str]) -> int:
        parts = [p for p in path.split("/") if p]
        body = self._body() if method in ("POST", "PUT", "PATCH") else {}
        self.reading.stop()  # read whole: waits, streams and exec sessions have their own ends
        if not parts or parts[0] != client_mod.API:
            raise Problem("NotFound", f"no route {path}; the API is under /{client_mod.API}/")
        d = self.daemon
        route = parts[1:]

        def allow(*methods: str) -> None:
            if method not in methods:
                raise Problem("MethodNotAllowed", f"{method} {path}: use {' or '.join(methods)}")

        if route == ["version"]:
            allow("GET")
            return self._json(200, {"version": __version__, "api": client_mod.API})
        if route == ["openapi.json"]:
            allow("GET")
            return self._json(200, openapi.document())
        if route == ["enclaves"]:
            allow("GET", "POST")
            if method == "GET":
                return self._json(200, d.list(_flag(query, "all"), self.peer_uid))
            if (self.headers.get("Upgrade") or "").strip() == client_mod.ATTACH:
                return self._attach(body)
            return self._json(201, d.create(body, self.peer_uid))
        if len(route) == 2 and route[0] == "enclaves":
            allow("GET", "DELETE")
            if method == "GET":
                return self._json(200, d.view(route[1], self.peer_uid))
            return self._json(200, d.remove(route[1], _flag(query, "force"), self.peer_uid))
        if len(route) == 3 and route[0] == "enclaves":
            ref, action = route[1], route[2]
            if action == "logs":
                allow("GET")
                tail = query.get("tail")
                if tail is not None and not (tail.isdigit() and len(tail) < 10):
                    raise Problem("InvalidRequest", "tail must be a number of lines")
                d.find(ref, self.peer_uid)  # a missing (or another's) enclave is a 404 before the stream begins
                return self._stream(
                    d.logs(ref, _flag(query, "follow"), None if tail is None else int(tail), self.peer_uid),
                    "application/octet-stream",
                )
            allow("POST")
            if action == "stop":
                timeout = _number(query.get("timeout", body.get("timeout", 10)), "timeout")
                return self._json(200, d.stop(ref, timeout, self.peer_uid))
            if action == "kill":
                signum = parse_signal(query.get("signal", body.get("signal", "KILL")))
                return self._json(200, d.signal(ref, signum, self.peer_uid))
            if action == "wait":
                return self._json(200, d.wait(ref, self.peer_uid))
            if action == "exec":
                if (self.headers.get("Upgrade") or "").strip() == execstream.PROTOCOL:
                    return self._exec_stream(ref, body)
                answer = d.exec(ref, body, self.peer_uid, self.connection)
                if answer is None:
                    self.close_connection = True
                    return 499  # the client left: nobody to answer
                return self._json(200, answer)
        if route == ["images"]:
            allow("GET")
            return self._json(200, d.images(self.peer_uid))
        if route == ["images", "prune"]:
            allow("POST")
            return self._json(200, d.prune(self.peer_uid))
        if len(route) == 2 and route[0] == "images":
            allow("DELETE")
            return self._json(200, d.remove_image(route[1], _flag(query, "force"), self.peer_uid))
        if route == ["events"]:
            allow("GET")
            since = _number(query.get("since", 0), "since")
            visible = None if self.peer_uid == 0 else d.visible_to(self.peer_uid)
            return self._stream(d.events.follow(since, _flag(query, "follow", True), visible), "application/x-ndjson")
        raise Problem("NotFound", f"no route {method} {path}")

    def _attach(self, body: JSON) -> int:
        """`cove run` through the daemon in one request: refusals are problems as for a plain create;
        then 101 Switching Protocols and the cove-attach/1 frames (docs/formats/daemon-api.md)."""
        d = self.daemon
        frames = d.attach(d.create(body, self.peer_uid, attached=True), self.peer_uid, self.connection)
        self.send_response(101)
        self.send_header("Connection", "Upgrade")
        self.send_header("Upgrade", client_mod.ATTACH)
        self.end_headers()
        self.close_connection = True
        try:
            for data in frames:
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError, ClientLeft):
            return 499  # the client left: the enclave goes on, and stays listed
        except Exception as exc:  # noqa: BLE001 - past the 101 no problem can be sent: the client sees the stream end
            log("fault", level="error", error=repr(exc), trace=traceback.format_exc(limit=8))
            return 500
        finally:
            frames.close()
        return 101

    def _exec_stream(self, ref: str, body: JSON) -> int:
        """``cove exec`` with its output streamed: 101 Switching Protocols, then frames both ways."""
        d = self.daemon
        enclave, path, helper = d.exec_helper(ref, body, self.peer_uid, stream=True)  # refusals are still problems
        self.send_response(101)
        self.send_header("Connection", "Upgrade")
        self.send_header("Upgrade", execstream.PROTOCOL)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        code = Session(self.connection, self.rfile, helper).run()
        d.exec_ended(enclave, path, code)
        return 101

    def _json(self, status: int, document: Any, kind: str = "application/json") -> int:
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return status

    def _problem(self, problem: Problem) -> int:
        self.close_connection = True
        return self._json(problem.status, problem.document(self.path[:200]), "application/problem+json")

    def _stream(self, chunks: Generator[bytes, None, None], kind: str) -> int:
        """A body of unknown length: chunked, flushed as it comes (logs -f, events)."""
        first = next(chunks, None)  # errors before the first byte are still problems
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in ([first] if first else []) + [None]:
                if chunk is None:
                    break
                self._chunk(chunk)
            for chunk in chunks:
                if chunk:
                    self._chunk(chunk)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        finally:
            chunks.close()
        return 200

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


def _flag(query: dict[str, str], name: str, default: bool = False) -> bool:
    value = query.get(name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no", ""):
        return False
    raise Problem("InvalidRequest", f"{name} must be true or false")


def _number(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise Problem("InvalidRequest", f"{name} must be a number") from None
    if not (0 <= number <= 1e7):
        raise Problem("InvalidRequest", f"{name} is out of range")
    return number


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Each connection on a thread of its own; at most ``max_connections`` open at once per uid other
    than root, so that no member can take the daemon's threads and descriptors (root is not counted)."""

    daemon_threads = True
    request_queue_size = 256
    max_connections = MAX_CONNECTIONS

    def server_bind(self) -> None:
        super().server_bind()
        self.open_connections: dict[int, int] = {}
        self.open_lock = threading.Lock()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        uid = _peer_uid(request)
        with self.open_lock:
            count = self.open_connections.get(uid, 0)
            if uid != 0 and count >= self.max_connections:
                count = -1
            else:
                self.open_connections[uid] = count + 1
        if count < 0:
            _refuse_connection(request, uid, self.max_connections)
            return False
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        uid = _peer_uid(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.open_lock:
                left = self.open_connections.get(uid, 1) - 1
                if left > 0:
                    self.open_connections[uid] = left
                else:
                    self.open_connections.pop(uid, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A fault outside a route (typically a client gone while its connection is read or flushed):
        one log line, never socketserver's traceback on stderr, which is the daemon's JSON log."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
            return  # the client left: its request was already logged
        log("fault", level="error", error=repr(exc), trace=traceback.format_exc(limit=8))


def _peer_uid(connection: socket.socket) -> int:
    return int(struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1])


def _refuse_connection(connection: socket.socket, uid: int, cap: int) -> None:
    """Answer a connection over the cap with a 503 problem, written without waiting (a fresh socket's buffer
    holds it; a peer that does not read loses it), before its request is read: the accepting thread never blocks."""
    problem = Problem(
        "TooManyConnections",
        f"uid {uid} already has {cap} connections open to the daemon; close some",
        ExitCode.REFUSED,
    )
    data = json.dumps(problem.document()).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    try:
        connection.send(head.encode() + data, socket.MSG_DONTWAIT)
    except OSError:
        pass
    log("connection_refused", level="warning", uid=uid, open=cap)


def bind(path: str, gid: int | None) -> UnixServer:
    """The listening socket at path: 0660, root:cove (or 0600 when there is no cove group)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o755, exist_ok=True)
    try:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1)
        probe.connect(path)
        probe.close()
        raise CoveError(f"a daemon already listens on {path}", "stop it first, or give another --socket")
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    old = os.umask(0o177)
    try:
        server = UnixServer(path, Handler, bind_and_activate=True)
    finally:
        os.umask(old)
    if gid is not None:
        os.chown(path, 0, gid)
        os.chmod(path, 0o660)
    return server


def _setting(name: str, default: float) -> float:
    """A positive number from the environment (the daemon's limits; docs/node.md), else the default."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not 0 < number <= 1e6:
        raise CoveError(f"{name}={value!r} is not a positive number", "unset it, or give a number up to 1e6")
    return number


def serve(
    root: Path,
    socket_path: str,
    group: str = client_mod.GROUP,
    metrics: str | None = None,
    log_max_bytes: int = logfile.DEFAULT_MAX_BYTES,
    log_files: int = logfile.DEFAULT_FILES,
) -> int:
    """Run the daemon until SIGTERM or SIGINT; enclaves go on without it."""
    if os.geteuid() != 0:
        raise CoveError(
            "cove daemon runs as root (it owns the image store and starts enclaves for others)",
            "start it with sudo or as the systemd unit scripts/setup installs",
        )
    timeout = _setting("COVE_DAEMON_READ_TIMEOUT", READ_TIMEOUT)  # before anything is started
    cap = max(1, int(_setting("COVE_DAEMON_MAX_CONNECTIONS", MAX_CONNECTIONS)))
    enclaves = max(1, int(_setting("COVE_DAEMON_MAX_ENCLAVES", MAX_ENCLAVES)))
    daemon = Daemon(root, socket_path, group, log_max_bytes, log_files)
    daemon.recover()
    if metrics:
        from cove.daemon.metrics import Metrics

        daemon.metrics = Metrics(daemon)
        try:
            daemon.metrics.serve(metrics)
        except (OSError, ValueError) as exc:
            raise CoveError(f"--metrics {metrics}: cannot listen there ({exc})", "give a free ADDRESS:PORT") from None
        log("metrics", address=metrics)
    daemon.max_enclaves = enclaves
    Handler.daemon = daemon
    Handler.timeout = timeout
    server = bind(socket_path, daemon.gid)
    server.max_connections = cap
    stopping = threading.Event()

    def leave(_signum: int, _frame: object) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    threading.Thread(target=watch, args=(daemon.registry, daemon.events, stopping), daemon=True).start()
    daemon._spawner()  # pre-load now, not at the first start
    log("listening", socket=socket_path, root=str(root), version=__version__, pid=os.getpid())
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        try:
            os.unlink(socket_path)
        except FileNotFoundError:
            pass
        log("stopped", enclaves_left_running=sum(1 for e in daemon.registry.all() if not e.ended))
    return 0
