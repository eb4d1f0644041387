"""One enclave's supervisor (``python -m cove.daemon.supervisor ENCLAVE_FOLDER STORE``), like a containerd shim.

The daemon starts it in a session of its own, with the enclave's log as its
stdout and stderr, and does not wait for it: when the daemon is killed or
upgraded the supervisor and its enclave go on, the program keeps appending to
the log, and the supervisor writes the exit code to ``state.json`` itself.
It launches from the store's verified tree (``launcher.run_verified`` with
``stored=True``), forwards SIGTERM and the other signals ``cove run``
forwards, and applies the restart policy with a doubling back-off.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from cove import trace
from cove.daemon import attestation, logfile
from cove.daemon.registry import read_record
from cove.runtime.procfs import process_start
from cove.errors import CoveError, IntegrityError
from cove.image.store import ImageStore
from cove.config import ResourcesSection
from cove.runtime import launcher, sim
from cove.runtime import enclave_services as services_mod
from cove.util import write_atomic

BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_RESET = 0.1, 10.0, 10.0
PER_RUN_ATTESTATION, ATTESTATION = "cove.runtime.attestation_service:services", "cove.daemon.attestation:services"


def parse_restart(policy: str) -> tuple[str, int | None]:
    """``no``, ``always``, ``on-failure`` or ``on-failure:N`` as (kind, limit)."""
    match = re.fullmatch(r"(no|always|on-failure)(?::([0-9]{1,6}))?", policy or "no")
    if match is None or (match.group(2) is not None and match.group(1) != "on-failure"):
        raise CoveError(f"--restart {policy!r}: use no, on-failure, on-failure:N or always")
    return match.group(1), int(match.group(2)) if match.group(2) else None


def should_restart(policy: str, code: int, restarts: int) -> bool:
    kind, limit = parse_restart(policy)
    if kind == "always":
        return True
    if kind == "on-failure" and code != 0:
        return limit is None or restarts < limit
    return False


class Supervisor:
    def __init__(self, folder: Path, store: Path, resources: ResourcesSection | None = None) -> None:
        self.folder = folder
        self.resources = resources  # the spawner's word for the image's limits: the sandbox is prepared early
        self.record = read_record(folder)
        self.store = ImageStore(store)
        self.state: dict[str, Any] = {"pid": os.getpid(), "pid_start": process_start(os.getpid()), "restarts": 0}
        self.stopping = False

    def save(self, **changes: Any) -> None:
        self.state.update(changes)
        # only the end (the exit code) is made durable: after a machine crash no enclave runs anyway; not
        # even that for `cove run` attached, whose client gets the exit code and whose enclave is removed
        durable = self.state.get("state") == "exited" and not self.record.get("attached")
        write_atomic(self.folder / "state.json", json.dumps(self.state).encode(), 0o600, sync=durable)

    def stop_requested(self) -> bool:
        return self.stopping or (self.folder / "stop").exists()

    def once(self) -> int:
        """Launch the enclave once; its exit code (or a Cove error's code, recorded with its line)."""
        if self.stop_requested():
            return 128 + signal.SIGTERM  # stopped before it began
        try:
            return self._once()
        finally:
            sim.discard_prepared()  # one not used (a failure before the launch, another backend)

    def _once(self) -> int:
        try:
            if self.resources is not None and self.record.get("backend") == "sim":
                with trace.span("supervisor.prepare"):  # the cgroups' join overlaps the checks below
                    sim.prepare(self.resources)  # used only if the verified configuration asks the same
            with trace.span("supervisor.attestation-server"):
                attestation.CONTROL = attestation.ensure_server(self.folder.parent.parent)
            with trace.span("supervisor.stored-image"):
                image = self.store.get(self.record["image"])
                verified = self.store.verified(image)
            if verified.measurement.hex() != self.record["measurement"]:
                raise IntegrityError("the stored image no longer has the measurement it was started with")
            if self.resources != verified.config.resources and self.record.get("backend") == "sim":
                sim.prepare(verified.config.resources)
            # the client's values of [env] passthrough names reach the enclave only, never this root process
            request = launcher.RunRequest(
                self.record["program"],
                tuple(self.record["args"]),
                self.record.get("backend"),
                host_env=dict(self.record.get("env", {})),
            )
            state_dir = Path(self.record["state_dir"]) if self.record.get("state_dir") else self.folder / "state"
            with trace.span("supervisor.save-running"):
                self.save(state="running", started=time.time(), finished=None, exit_code=None, error=None)
            return launcher.run_verified(verified, image.root, request, state_dir, build_dir=image.build, stored=True)
        except CoveError as exc:
            self.save(error=exc.line())
            return int(exc.exit_code)
        except OSError as exc:
            self.save(error=f"{exc.filename or 'a file'}: {exc.strerror or exc}")
            return 9

    def run(self) -> int:
        """Run the enclave (with its restarts); with a log size set, through a rotating log writer."""
        self._begin()  # first: the daemon's create waits for this state, not for the writer's thread
        max_bytes = self.record.get("log_max_bytes")
        if not max_bytes:
            return self._run()
        read, write = os.pipe()
        with trace.span("supervisor.log-writer"):
            writer = logfile.Writer(
                read, self.folder / "log", int(max_bytes), int(self.record.get("log_files") or logfile.DEFAULT_FILES)
            ).start()
        os.dup2(write, 1)  # the enclave writes to the pipe; the writer alone writes the files
        os.dup2(write, 2)
        os.close(write)
        try:
            return self._run()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            direct = os.open(self.folder / "log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.dup2(direct, 1)  # closes this process's write ends of the pipe
            os.dup2(direct, 2)
            os.close(direct)
            writer.finish()

    def _begin(self) -> None:
        # /dev/attestation from the node's one server, not a server process per run
        services_mod.FACTORIES[:] = [ATTESTATION if f == PER_RUN_ATTESTATION else f for f in services_mod.FACTORIES]

        def stop(_signum: int, _frame: object) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)  # before the state: with it the daemon may signal this process
        signal.signal(signal.SIGINT, stop)
        with trace.span("supervisor.save-starting"):
            self.save(state="starting")

    def _run(self) -> int:
        delay = BACKOFF_FIRST
        while True:
            began = time.monotonic()
            code = self.once()
            if self.stop_requested() or not should_restart(
                self.record.get("restart", "no"), code, self.state["restarts"]
            ):
                with trace.span("supervisor.save-exited"):
                    self.save(state="exited", exit_code=code, finished=time.time())
                return code
            if time.monotonic() - began > BACKOFF_RESET:
                delay = BACKOFF_FIRST  # it ran a while: start the back-off again
            self.save(state="restarting", exit_code=code, finished=time.time(), restarts=self.state["restarts"] + 1)
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and not self.stop_requested():
                time.sleep(0.05)
            if self.stop_requested():
                self.save(state="exited")
                return code
            delay = min(delay * 2, BACKOFF_MAX)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m cove.daemon.supervisor ENCLAVE_FOLDER STORE", file=sys.stderr)
        return 2
    if os.fork():
        os._exit(0)  # the daemon reaps this first process at once; the supervisor is nobody's child to wait for
    return Supervisor(Path(argv[0]), Path(argv[1])).run() & 0xFF


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
