"""Lifecycle events (`cove events`): what the daemon did and saw, as JSON lines, in order.

The daemon keeps the last events in memory, numbered; a client asks for
those after a number and, following, waits for new ones. Exits that a
supervisor records while the daemon runs are noticed by :func:`watch`.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque

KEEP = 10_000


class Events:
    def __init__(self) -> None:
        self.items: deque[dict] = deque(maxlen=KEEP)
        self.next = 1
        self.changed = threading.Condition()
        # what watch() last saw of each enclave, (status, restarts); a start seeds it, so an enclave
        # that exits (or restarts) before watch() first looks still gets its die (and restart) events
        self.last_seen: dict[str, tuple] = {}

    def emit(self, kind: str, action: str, ident: str, **attributes) -> dict:
        with self.changed:
            event = {"seq": self.next, "time": round(time.time(), 3), "type": kind, "action": action,
                     "id": ident, **attributes}
            self.next += 1
            self.items.append(event)
            self.changed.notify_all()
        return event

    def after(self, seq: float) -> list[dict]:
        with self.changed:
            return [e for e in self.items if e["seq"] > seq]

    def follow(self, since: float = 0, follow: bool = True):
        """Newline-delimited JSON of the events after ``since``; with follow, forever."""
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
                yield b"".join(json.dumps(e).encode() + b"\n" for e in batch)
            elif follow:
                yield b"\n"  # a keep-alive: a client that left is noticed here


def watch(registry, events: Events, stop: threading.Event, interval: float = 0.5) -> None:
    """Emit ``die`` (and ``restart``) events for state changes the supervisors record."""
    seen = events.last_seen
    while not stop.wait(interval):
        try:
            enclaves = registry.all()
        except OSError:
            continue
        for enclave in enclaves:
            key = (enclave.status, enclave.state.get("restarts", 0))
            before = seen.get(enclave.id)
            seen[enclave.id] = key
            if before is None or before == key:
                continue
            if enclave.status == "exited":
                events.emit("enclave", "die", enclave.id, name=enclave.name,
                            exit_code=enclave.state.get("exit_code"))
            elif enclave.status == "restarting":
                events.emit("enclave", "restart", enclave.id, name=enclave.name,
                            exit_code=enclave.state.get("exit_code"), restarts=key[1])
