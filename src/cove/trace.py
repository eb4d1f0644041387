"""Start-path timing spans, off unless ``COVE_TRACE_START`` is set (standard library only).

``COVE_TRACE_START=1`` prints one line per span on stderr; any other value
is a file the lines are appended to (a supervisor's stderr is its enclave's
log, so a daemon started with ``COVE_TRACE_START=/tmp/cove.trace`` gets its
supervisors' spans there). A line is ``cove-trace PID NAME START_MS
DURATION_MS``, START_MS counted from the process's first span: what
docs/performance.md uses to say where a start's milliseconds go.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

ENV = "COVE_TRACE_START"
_origin: list[float] = []


def emit(name: str, began: float, ended: float) -> None:
    """Write one span (perf_counter seconds) where COVE_TRACE_START says; never fails the caller."""
    where = os.environ.get(ENV)
    if not where:
        return
    if not _origin:
        _origin.append(began)
    line = f"cove-trace {os.getpid()} {name} {(began - _origin[0]) * 1000:.2f} {(ended - began) * 1000:.2f}\n"
    try:
        if where == "1":
            sys.stderr.write(line)
            sys.stderr.flush()
        else:
            # no symbolic link followed (a root daemon's trace file may be in /tmp), private, not inherited
            fd = os.open(where, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    except (OSError, ValueError):
        pass


@contextmanager
def span(name: str) -> Iterator[None]:
    """Time the block as one span (free when tracing is off)."""
    if not os.environ.get(ENV):
        yield
        return
    began = time.perf_counter()
    try:
        yield
    finally:
        emit(name, began, time.perf_counter())


class Laps:
    """Consecutive spans of one path: each ``lap(name)`` ends the span begun by the previous one."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        emit(self.prefix + name, self.last, now)
        self.last = now

    @contextmanager
    def on_exit(self, name: str) -> Iterator[None]:
        """A lap ended when the block is left (put first in a ``with``, it times the others' exits)."""
        try:
            yield
        finally:
            self.lap(name)
