"""The enclaves of this node, on disk, so that they and their state outlive the daemon.

Each enclave is a folder ``enclaves/ID`` holding ``record.json`` (what was
asked: written once, before the folder is renamed into place, so a record is
whole or absent), ``state.json`` (written only by the enclave's supervisor:
its pid, the state, the exit code), ``log`` (the program's output, appended
by the program itself) and, once a stop is asked, ``stop``. A name is a
symbolic link ``names/NAME -> ID`` made with one ``symlink`` call: of two
clients asking for the same name, exactly one gets it. A restarted daemon
only reads these folders again.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cove.decode import Fields, decode_json
from cove.errors import CoveError, NotFoundError
from cove.runtime.procfs import process_start
from cove.util import write_atomic

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
ID = re.compile(r"^[0-9a-f]{64}$")
ENDED = ("exited",)
MAX_FILE = 16 << 20  # record.json holds one API body (at most 1 MiB) re-encoded: a cap, not a tight bound


class ConflictError(CoveError):
    """The name is taken, or the enclave is in a state that forbids the action."""


def owns(enclave: Enclave, uid: int | None) -> bool:
    """Whether uid may see and act on the enclave: root (or no uid given: the daemon itself), or its creator."""
    return uid is None or uid == 0 or enclave.record.get("uid") == uid


def alive(pid: int | None, start: int | None) -> bool:
    """Whether this very process (pid and start time, so a reused pid does not count) still runs."""
    if not pid:
        return False
    now = process_start(pid)
    if now is None or (start is not None and now != start):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
        return data[data.rindex(b")") + 2 :][:1] != b"Z"
    except OSError:
        return False


@dataclass
class Enclave:
    folder: Path
    record: dict[str, Any]
    state: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.record["id"])

    @property
    def name(self) -> str:
        return str(self.record["name"])

    @property
    def status(self) -> str:
        return str(self.state.get("state", "created"))

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @property
    def log(self) -> Path:
        return self.folder / "log"

    def supervisor_alive(self) -> bool:
        return alive(self.state.get("pid"), self.state.get("pid_start"))

    def view(self) -> dict[str, Any]:
        """What the API answers for this enclave (docs/formats/daemon-api.md)."""
        state = dict(self.state)
        now = time.time()
        started, finished = state.get("started"), state.get("finished")
        uptime = None
        if started and not self.ended:
            uptime = now - started
        return {
            **{
                k: self.record[k]
                for k in (
                    "id",
                    "name",
                    "image",
                    "measurement",
                    "signer",
                    "backend",
                    "program",
                    "args",
                    "instance",
                    "created",
                    "restart",
                )
            },
            "state": self.status,
            "exit_code": state.get("exit_code"),
            "error": state.get("error"),
            "started": started,
            "finished": finished,
            "uptime": uptime,
            "restarts": state.get("restarts", 0),
            "supervisor_pid": state.get("pid"),
            "enclave_pid": state.get("enclave_pid"),
        }


def read_object(path: Path) -> dict[str, Any]:
    """One of the daemon's own JSON files (record.json, state.json) as an object; ValueError if it is not."""
    with open(path, "rb") as handle:
        value = decode_json(handle.read(MAX_FILE + 1), ValueError, path.name, limit=MAX_FILE)
    if not isinstance(value, dict):
        raise ValueError(f"{path.name} is not an object")
    return value


def read_record(folder: Path) -> dict[str, Any]:
    """An enclave's record.json, with the id and name every reader uses (ValueError if not)."""
    record = read_object(folder / "record.json")
    fields = Fields(record, "record.json", ValueError)
    fields.text("id", max_len=64)
    fields.text("name", max_len=63)
    return record


class Registry:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.enclaves = self.root / "enclaves"
        self.names = self.root / "names"
        self.incoming = self.root / "incoming"
        for folder in (self.root, self.enclaves, self.names, self.incoming):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- creation

    def create(self, record: dict[str, Any]) -> Enclave:
        """Reserve the name, then write the record whole and rename it into place."""
        ident = secrets.token_hex(32)
        name = record.get("name") or f"enclave-{ident[:12]}"
        if not NAME.match(name):
            raise CoveError(
                f"--name {name!r}: use 1 to 63 letters, digits, '_', '.' or '-', beginning with a letter or digit"
            )
        try:
            os.symlink(ident, self.names / name)
        except FileExistsError:
            raise ConflictError(
                f"the name {name!r} is already used by an enclave",
                f"choose another, or remove it with `cove rm {name}`",
            ) from None
        try:
            folder = self.incoming / ident
            folder.mkdir(mode=0o700)
            record = dict(record, id=ident, name=name, created=time.time())
            # The fsync is not what makes a kill -9 of the daemon lose no enclave: the written record is in
            # the page cache, which outlives any process, and the supervisor's state says the rest. It only
            # keeps a detached enclave's record (`ps -a`, logs, its fsynced end) across a crash of the
            # machine. An attached `cove run`'s enclave is removed at its end, which is not fsynced either,
            # so its record skips the 1 to 3 ms; what such a crash can leave, a record.json that does not
            # parse, recover() removes.
            write_atomic(folder / "record.json", json.dumps(record).encode(), 0o600, sync=not record.get("attached"))
            os.close(os.open(folder / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
            os.rename(folder, self.enclaves / ident)
        except BaseException:
            shutil.rmtree(self.incoming / ident, ignore_errors=True)
            _unlink(self.names / name)
            raise
        return self.load(ident)

    # -- reading

    def load(self, ident: str) -> Enclave:
        folder = self.enclaves / ident
        return Enclave(folder, read_record(folder), _state_of(folder))

    def all(self) -> list[Enclave]:
        found = []
        for entry in sorted(os.scandir(self.enclaves), key=lambda e: e.name):
            if ID.match(entry.name):
                try:
                    found.append(self.load(entry.name))
                except (OSError, ValueError):
                    continue
        found.sort(key=lambda e: e.record.get("created", 0), reverse=True)
        return found

    def find(self, ref: str, owner: int | None = None) -> Enclave:
        """An enclave by name, full id or unique id prefix; with ``owner``, only one that uid started.

        Another user's enclave is "not found", exactly as a missing one, and takes no part in a prefix
        match: a member of the group learns nothing of the enclaves of others.
        """
        if not ref or "/" in ref or ref.startswith("."):
            raise NotFoundError(f"no enclave {ref!r}")
        found: Enclave | None = None
        try:
            target = os.readlink(self.names / ref)
            if ID.match(target) and (self.enclaves / target).is_dir():
                found = self.load(target)
        except OSError:
            pass
        if found is None and ID.match(ref) and (self.enclaves / ref).is_dir():
            found = self.load(ref)
        if found is not None and owns(found, owner):
            return found
        if re.fullmatch(r"[0-9a-f]{1,63}", ref):
            matches = []
            for entry in os.scandir(self.enclaves):
                if entry.name.startswith(ref) and ID.match(entry.name):
                    try:
                        candidate = self.load(entry.name)
                    except (OSError, ValueError, CoveError):
                        continue
                    if owns(candidate, owner):
                        matches.append(candidate)
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise CoveError(f"{ref!r} matches {len(matches)} enclaves: give more of the id")
        raise NotFoundError(f"no enclave {ref!r}", "`cove ps -a` lists them")

    # -- upkeep

    def settle(self, enclave: Enclave) -> Enclave:
        """An enclave whose supervisor died without saying how it ended (kill -9) is recorded as killed.

        A supervisor writes how its enclave ended, then exits. A state read before that write and a look
        at the process after the exit would make a clean end "killed" (exit 137), so once the supervisor
        is seen dead its state is read again: whatever it wrote before dying is there now.
        """
        if enclave.ended or enclave.supervisor_alive():
            return enclave
        if not enclave.state:
            return enclave  # a supervisor not yet started; the caller decides
        try:
            fresh = read_object(enclave.folder / "state.json")
        except (OSError, ValueError):
            fresh = enclave.state
        if fresh != enclave.state:
            enclave.state = fresh
            if not fresh or enclave.ended or enclave.supervisor_alive():  # it ended cleanly, or was restarted
                return enclave
        state = dict(
            enclave.state,
            state="exited",
            exit_code=enclave.state.get("exit_code") or 137,
            error=enclave.state.get("error") or "its supervisor was killed",
            finished=enclave.state.get("finished") or time.time(),
        )
        write_atomic(enclave.folder / "state.json", json.dumps(state).encode(), 0o600)
        enclave.state = state
        return enclave

    def remove(self, enclave: Enclave, purge: bool = True) -> Path:
        """Unlist the enclave (its name freed, its folder renamed into incoming/ in one step), then delete
        that folder; with ``purge`` False the caller deletes it later with :meth:`purge` (an attached run's
        end is sent first: the deletion takes milliseconds). A folder a kill leaves in incoming/ is removed
        by :meth:`recover`."""
        _unlink(self.names / enclave.name)
        doomed = self.incoming / f"rm-{enclave.id}"
        os.rename(enclave.folder, doomed)
        if purge:
            self.purge(doomed)
        return doomed

    @staticmethod
    def purge(doomed: Path) -> None:
        """Delete the folder :meth:`remove` renamed away."""
        shutil.rmtree(doomed, ignore_errors=True)

    def recover(self) -> list[str]:
        """At daemon start: drop half-made records and stale names; settle the dead. Returns removed ids."""
        removed = []
        for entry in os.scandir(self.incoming):
            shutil.rmtree(entry.path, ignore_errors=True)
        for entry in os.scandir(self.enclaves):  # a record is whole before its folder is renamed in: one that
            if ID.match(entry.name):  # does not read was not synced before the machine crashed (see create)
                try:
                    read_record(Path(entry.path))
                except (OSError, ValueError):
                    if Enclave(Path(entry.path), {}, _state_of(Path(entry.path))).supervisor_alive():
                        continue  # not after a crash, then: left for an administrator to look at
                    os.rename(entry.path, self.incoming / f"rm-{entry.name}")
                    shutil.rmtree(self.incoming / f"rm-{entry.name}", ignore_errors=True)
                    removed.append(entry.name)
        for enclave in self.all():
            if not enclave.state:
                self.remove(enclave)  # registered but never started: the daemon died in between
                removed.append(enclave.id)
            else:
                self.settle(enclave)
        for entry in os.scandir(self.names):
            try:
                target = os.readlink(entry.path)
            except OSError:
                continue
            if not (self.enclaves / target).is_dir():
                _unlink(Path(entry.path))
        return removed


def _state_of(folder: Path) -> dict[str, Any]:
    """An enclave's state.json; empty when its supervisor has written none (or none that reads)."""
    try:
        return read_object(folder / "state.json")
    except (OSError, ValueError):
        return {}


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
