"""Lifecycle events (`cove events`): what the daemon did and saw, as JSON lines, in order.

The daemon keeps the last events in memory, numbered, and appends each one
to a bounded journal under its root (``events.jsonl``, and the previous
file as ``events.jsonl.1`` once it reaches its size), so a restarted daemon
goes on with the same numbers and ``--since`` replays across the restart. A
client asks for those after a number and, following, waits for new ones.
Exits and restarts that a supervisor records are noticed by :func:`watch`,
which compares them with what the journal last said of each enclave: one
that ended while no daemon ran gets its ``die`` after the restart.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, Protocol

from cove.decode import decode_json
from cove.runtime import limits

KEEP = 10_000
JOURNAL_BYTES = 4 << 20  # per file; the journal and one previous file are kept
MAX_LINE = JOURNAL_BYTES  # one journal line: at most a whole file

Event = dict[str, Any]
Seen = tuple[str, int]


class _Registry(Protocol):
    def all(self) -> list[Any]: ...


class Events:
    def __init__(self, journal: Path | None = None, max_bytes: int = JOURNAL_BYTES) -> None:
        self.items: deque[Event] = deque(maxlen=KEEP)
        self.next = 1
        self.changed = threading.Condition()
        # what watch() last saw of each enclave, (status, restarts); a start seeds it, so an enclave
        # that exits (or restarts) before watch() first looks still gets its die (and restart) events
        self.last_seen: dict[str, Seen] = {}
        self.journal = journal
        self.max_bytes = max(1024, max_bytes)
        self._fd: int | None = None
        self._size = 0
        if journal is not None:
            self._load(journal)

    # -- the journal

    def _load(self, journal: Path) -> None:
        """Read back the previous file and the journal; a torn or foreign line is skipped."""
        last = 0
        for path in (journal.with_name(journal.name + ".1"), journal):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            for line in data.splitlines():
                try:
                    event = decode_json(line, ValueError, "journal line", limit=MAX_LINE)
                except ValueError:
                    continue
                if not isinstance(event, dict):
                    continue
                seq = event.get("seq")
                if not isinstance(seq, int) or isinstance(seq, bool) or seq <= last:
                    continue
                last = seq
                self.items.append(event)
                self._seed(event)
        self.next = last + 1
        self._fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._size = os.fstat(self._fd).st_size
        if self._size and not journal.read_bytes().endswith(b"\n"):
            self._size += os.write(self._fd, b"\n")  # a line torn by a kill: the next one starts clean

    def _seed(self, event: Event) -> None:
        """What the journal says of an enclave's state, for watch() to compare with after a restart."""
        if event.get("type") != "enclave" or not isinstance(event.get("id"), str):
            return
        ident, action = event["id"], event.get("action")
        raw = event.get("restarts")
        restarts = raw if isinstance(raw, int) else 0
        if action == "start":
            self.last_seen[ident] = ("running", 0)
        elif action == "restart":
            self.last_seen[ident] = ("restarting", restarts)
        elif action == "die":
            self.last_seen[ident] = ("exited", restarts)
        elif action == "remove":
            self.last_seen.pop(ident, None)

    def _append(self, event: Event) -> None:
        if self._fd is None or self.journal is None:
            return
        line = json.dumps(event).encode() + b"\n"
        try:
            if self._size and self._size + len(line) > self.max_bytes:
                os.replace(self.journal, self.journal.with_name(self.journal.name + ".1"))
                os.close(self._fd)
                self._fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._size = 0
            self._size += os.write(self._fd, line)  # one write of one line: whole, or absent after a kill
        except OSError:
            pass  # a full disk loses the journal's copy, never the event

    def close(self) -> None:
        with self.changed:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # -- events

    def emit(self, kind: str, action: str, ident: str, **attributes: Any) -> Event:
        with self.changed:
            event = {
                "seq": self.next,
                "time": round(time.time(), 3),
                "type": kind,
                "action": action,
                "id": ident,
                **attributes,
            }
            self.next += 1
            self.items.append(event)
            self._append(event)
            self.changed.notify_all()
        return event

    def after(self, seq: float) -> list[Event]:
        with self.changed:
            return [e for e in self.items if e["seq"] > seq]

    def follow(
        self, since: float = 0, follow: bool = True, visible: Callable[[Event], bool] | None = None
    ) -> Generator[bytes, None, None]:
        """Newline-delimited JSON of the events after ``since`` (only those ``visible`` passes); with follow, forever."""
        last = since
        while True:
            with self.changed:
                batch = [e for e in self.items if e["seq"] > last]
                if not batch:
                    if not follow:
                        return
                    self.changed.wait(timeout=15)
                    batch = [e for e in self.items if e["seq"] > last]
            if batch:
                last = batch[-1]["seq"]
            shown = batch if visible is None else [e for e in batch if visible(e)]
            if shown:
                yield b"".join(json.dumps(e).encode() + b"\n" for e in shown)
            elif follow:
                yield b"\n"  # a keep-alive: a client that left is noticed here
            elif not batch:
                return


def notice(registry: _Registry, events: Events) -> None:
    """One look at every enclave: ``die`` and ``restart`` events for the changes since the last look."""
    seen = events.last_seen
    for enclave in registry.all():
        key = (enclave.status, int(enclave.state.get("restarts", 0) or 0))
        before = seen.get(enclave.id)
        seen[enclave.id] = key
        if before is None or before == key:
            continue
        if key[0] == "exited":
            if before[0] != "exited":
                events.emit(
                    "enclave",
                    "die",
                    enclave.id,
                    name=enclave.name,
                    uid=enclave.record.get("uid"),
                    exit_code=enclave.state.get("exit_code"),
                    restarts=key[1],
                )
        elif key[0] == "restarting" or key[1] > before[1]:
            events.emit(
                "enclave",
                "restart",
                enclave.id,
                name=enclave.name,
                uid=enclave.record.get("uid"),
                exit_code=enclave.state.get("exit_code"),
                restarts=key[1],
            )


def watch(registry: _Registry, events: Events, stop: threading.Event, interval: float = 0.5) -> None:
    """Notice state changes the supervisors record, every ``interval`` seconds, until ``stop``."""
    while True:
        try:
            notice(registry, events)
            limits.reap_stale()  # what a supervisor killed in the middle of a start left (docs/node.md)
        except OSError:
            pass
        if stop.wait(interval):
            return
