"""Setting a broker up and running it: `cove kbs init`, `cove kbs serve`, an embedded broker.

A broker's state folder (default ``~/.local/state/cove/kbs``, or
``$COVE_KBS_STATE``) holds, after ``init``: ``master.key`` (0600),
``kbs.db`` (SQLite, unless ``--db`` names PostgreSQL), ``admin.json`` (the
first admin key, 0600), and a local TLS CA and certificate (``tls-ca.pem``,
``tls.crt``, ``tls.key``) unless a certificate is brought.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cove import util
from cove.errors import CoveError
from cove.kbs import tls, vault
from cove.kbs.broker import Broker, Settings
from cove.util import write_atomic


def default_state() -> Path:
    configured = os.environ.get("COVE_KBS_STATE")
    if configured:
        return Path(configured)
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "cove" / "kbs"


def default_db(state: Path) -> str:
    return f"sqlite:///{state / 'kbs.db'}"


@dataclass(frozen=True)
class InitResult:
    state: Path
    db: str
    master_key_file: Path | None
    admin_key_file: Path
    tls: tuple[Path, Path, Path] | None
    audience: str


def init(
    state: Path,
    db: str | None = None,
    master_key_file: Path | None = None,
    admin_name: str = "admin",
    tls_names: tuple[str, ...] | None = ("localhost", "127.0.0.1"),
    url: str | None = None,
    sealed: bool = False,
) -> InitResult:
    """Create a broker's state: master key, database, first admin key, local TLS (each only if missing).

    ``sealed``: keep the master key sealed to this platform (STATE/master.sealed) instead of in a key file.
    """
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = db or default_db(state)
    key_file = master_key_file or state / "master.key"
    sealed_file = state / "master.sealed"
    used: Path | None = key_file  # where the master key is kept (None: only in the environment)
    if sealed_file.exists() and master_key_file is None:
        master, used = vault.load_master_key(None, sealed_file, environ={}), sealed_file
    elif sealed and master_key_file is None and not key_file.exists():
        import secrets as pysecrets

        master = pysecrets.token_bytes(32)
        vault.seal_to_platform(master, sealed_file)
        used = sealed_file
    elif key_file.exists():
        master = vault.load_master_key(key_file)
    elif os.environ.get(vault.ENV_VAR) and master_key_file is None:
        master, used = vault.load_master_key(None, environ=os.environ), None
    else:
        master = vault.new_key_file(key_file)
    broker = Broker(Settings(db_url=db, master_key=master))
    try:
        admin_file = state / "admin.json"
        if not admin_file.exists():
            from joserfc import jwk

            key = jwk.generate_key("EC", "P-256")
            if not broker.bootstrap_admin(admin_name, key.as_dict(private=False)):
                raise CoveError(
                    f"the database already has an admin key {admin_name!r} but {admin_file} is missing",
                    "pass --admin-name with a new name",
                )
            document = {"name": admin_name, "audience": broker.audience, "url": url, "jwk": key.as_dict(private=True)}
            write_atomic(admin_file, json.dumps(document, indent=2).encode() + b"\n", mode=0o600)
        audience = broker.audience
    finally:
        broker.store.close()
    made_tls = None
    if tls_names and not (state / "tls.crt").exists():
        made_tls = tls.make_local_tls(state, tls_names)
    elif (state / "tls.crt").exists():
        made_tls = (state / "tls-ca.pem", state / "tls.crt", state / "tls.key")
    return InitResult(state, db, used, admin_file, made_tls, audience)


def _listen(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise CoveError(f"--listen {address}: expected HOST:PORT, e.g. 127.0.0.1:8443") from None
    if not 0 <= number <= 65535:
        raise CoveError(f"--listen {address}: port out of range")
    return host, number


def http_protocol() -> type[asyncio.Protocol] | Literal["auto"]:
    """uvicorn's HTTP implementation: the broker's own (one write per response) if httptools is there."""
    try:
        from cove.kbs.wire import HttpProtocol
    except ImportError:
        return "auto"
    return HttpProtocol


def serve(options: dict[str, Any], listen: str, workers: int = 1, access_log: bool = False) -> None:
    """Run the broker until interrupted (options: see server.settings_from_options, plus certfile/keyfile)."""
    import uvicorn

    from cove.kbs.server import ENV_CONFIG, app_from_env, create_app, settings_from_options

    host, port = _listen(listen)
    settings = settings_from_options(options)
    broker = Broker(settings)  # migrations, master key check, broker keys: fail here with one line
    ssl = {}
    if options.get("certfile"):
        for name in ("certfile", "keyfile"):
            if not options.get(name) or not Path(options[name]).is_file():
                raise CoveError(
                    f"TLS {name} {options.get(name)} not found", "pass --cert and --key, or run `cove kbs init`"
                )
        ssl = {"ssl_certfile": options["certfile"], "ssl_keyfile": options["keyfile"]}
    common = dict(
        host=host,
        port=port,
        access_log=access_log,
        log_level="info",
        timeout_keep_alive=30,
        proxy_headers=False,
        server_header=False,
        http=http_protocol(),
        **ssl,
    )
    try:
        if workers > 1:
            broker.store.close()
            if REUSEPORT:
                _check_tls(ssl)  # here, one line, rather than a traceback from each worker
            probe = _claim_port(host, port) if REUSEPORT else None
            if probe is not None:
                with probe:
                    _serve_reuseport(options, host, probe.getsockname()[1], workers, common)
                return
            os.environ[ENV_CONFIG] = json.dumps(options)
            uvicorn.run("cove.kbs.server:app_from_env", factory=True, workers=workers, **common)
        else:
            uvicorn.run(create_app(broker, https=bool(ssl)), **common)
    except OSError as exc:
        raise CoveError(f"cannot listen on {listen}: {exc.strerror}") from None
    _ = app_from_env  # the factory workers import


# Each worker of `--workers N` listens on a socket of its own, bound to the same address with
# SO_REUSEPORT, and the kernel spreads new connections over them by a hash of their addresses.
# With one shared socket (uvicorn's supervisor) whichever worker woke first accepted a whole burst:
# 32 connections opened at once were split 31/2, 23/10, 19/14 (docs/kbs.md, "Workers").
REUSEPORT = hasattr(socket, "SO_REUSEPORT")
_RESTART_PAUSE = 1.0  # seconds between restarts of a worker that died after it served


def reuseport_socket(host: str, port: int, listen: bool = True) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT, listening unless ``listen`` is False.

    Linux lets only sockets of the same effective user join a port's group, so
    another local user cannot take a share of the broker's connections.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _claim_port(host: str, port: int) -> socket.socket:
    """A socket that holds host:port for the workers: bound with SO_REUSEPORT, not listening.

    First the port is bound without SO_REUSEPORT, which fails if any process listens
    on it: a second broker started on the port is refused as it would be without
    SO_REUSEPORT, instead of silently taking a share of the first one's connections.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as check:
        check.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections in TIME_WAIT do not count
        check.bind((host, port))
        port = check.getsockname()[1]
    return reuseport_socket(host, port, listen=False)


def _check_tls(ssl: dict[str, str]) -> None:
    """Load the TLS certificate and key as the workers will (an OSError: ssl.SSLError, a missing file)."""
    if ssl:
        import ssl as tls_module

        tls_module.SSLContext(tls_module.PROTOCOL_TLS_SERVER).load_cert_chain(ssl["ssl_certfile"], ssl["ssl_keyfile"])


def _serve_reuseport(options: dict[str, Any], host: str, port: int, workers: int, common: dict[str, Any]) -> None:
    """Run ``workers`` worker processes, each on its own SO_REUSEPORT socket, until SIGTERM or SIGINT;
    SIGHUP replaces them one at a time (as uvicorn's supervisor does).

    The caller holds a socket bound to the port and not listening: it keeps the
    port between restarts of a worker and receives no connections. This process
    holds no listening socket, so a worker's death closes its socket and the
    kernel sends new connections to the others until its replacement listens.
    A worker that dies before it served stops them all (the same fault would
    kill every replacement); one that dies later is replaced.
    """
    import multiprocessing
    import signal
    import sys

    context = multiprocessing.get_context("spawn")  # no fork of a process with a database and threads
    stop = util.Wakeup()  # set from a signal handler (cove.util.Wakeup says why)
    settings = json.dumps(options)

    def start() -> tuple[Any, Any]:
        ready = context.Event()
        process = context.Process(
            target=_reuseport_worker, args=(settings, host, port, common, ready, os.getpid()), name="cove-kbs-worker"
        )
        process.start()
        return process, ready

    def replace_all() -> None:
        """SIGHUP: each worker in turn, a new one first; the old one goes once the new one listens."""
        for index, (old, _) in enumerate(running):
            process, ready = start()
            deadline = time.monotonic() + 60
            while not ready.wait(0.1) and process.is_alive() and not stop.is_set() and time.monotonic() < deadline:
                pass
            if not ready.is_set():
                process.kill()
                process.join()
                print("cove kbs serve: a new worker did not start; the old ones keep serving", file=sys.stderr)
                return
            old.terminate()
            old.join()
            running[index] = (process, ready)

    reload = util.Wakeup()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: reload.set())
    running = [start() for _ in range(workers)]
    print(f"cove kbs serve: {workers} workers on {host}:{port}, each with its own SO_REUSEPORT socket", file=sys.stderr)
    try:
        while not stop.wait(0.5):
            if reload.is_set():
                reload.clear()
                replace_all()
            for index, (process, ready) in enumerate(running):
                if process.is_alive():
                    continue
                if not ready.is_set():
                    raise CoveError(
                        f"a broker worker exited before it served (exit code {process.exitcode})",
                        "its error is in the log above",
                    )
                time.sleep(_RESTART_PAUSE)
                running[index] = start()
    finally:
        for process, _ in running:
            if process.is_alive():
                process.terminate()
        for process, _ in running:
            process.join(15)
            if process.is_alive():
                process.kill()
                process.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop.close()
        reload.close()


def _reuseport_worker(settings: str, host: str, port: int, common: dict[str, Any], ready: Any, parent: int) -> None:
    """One worker process: its own listening socket, the broker from the options, uvicorn.

    It ends with its parent, even one killed with SIGKILL (PR_SET_PDEATHSIG): a worker
    left behind would keep serving the port with a broker nobody supervises.
    """
    import ctypes
    import signal
    import sys

    import uvicorn

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the request took effect
        sys.exit(0)

    from cove.kbs.server import ENV_CONFIG

    class Worker(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                ready.set()

    os.environ[ENV_CONFIG] = settings
    try:
        sock = reuseport_socket(host, port)
    except OSError as exc:
        sys.stderr.write(f"cove: error: cannot listen on {host}:{port}: {exc.strerror}\n")
        sys.exit(3)
    config = uvicorn.Config("cove.kbs.server:app_from_env", factory=True, **common)
    try:
        config.load()  # the TLS files and the broker (uvicorn logs a failing factory and exits)
    except OSError as exc:
        sys.stderr.write(f"cove: error: cannot listen on {host}:{port}: {exc.strerror or exc}\n")
        sys.exit(3)
    Worker(config).run(sockets=[sock])


class EmbeddedBroker:
    """A broker served from a thread on loopback (cove demo, tests): start(), url, stop()."""

    def __init__(
        self, broker: Broker, certfile: Path | None = None, keyfile: Path | None = None, host: str = "127.0.0.1"
    ):
        import uvicorn

        from cove.kbs.server import create_app

        self.broker = broker
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, 0))
        self.port = self._socket.getsockname()[1]
        https = certfile is not None
        self.url = f"{'https' if https else 'http'}://{host}:{self.port}"
        self._app = create_app(broker, https=https)
        config = uvicorn.Config(
            self._app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            http=http_protocol(),
            ssl_certfile=str(certfile) if https else None,
            ssl_keyfile=str(keyfile) if https else None,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="cove-kbs", daemon=True
        )

    def start(self) -> EmbeddedBroker:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise CoveError("the embedded key broker did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._app.state.off_loop.close()
        try:
            self._socket.close()
        except OSError:
            pass
        self.broker.store.close()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
