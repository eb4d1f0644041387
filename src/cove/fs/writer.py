"""A second thread for the host writes of a protected file.

Sealing a node is CPU work under the GIL; copying it into the page cache
(``pwrite``) releases the GIL. Handing large runs of sealed nodes to one
writer thread lets the next run be sealed while the previous one is
written. Order is kept: the thread writes runs in the order given, and
every point that depends on the disk (a read, an undo-log read of old
content, the commit write, fsync, truncation) calls :meth:`drain` first.
"""

from __future__ import annotations

import os
import queue
import threading

MAX_IN_FLIGHT = 8  # runs queued at most (each up to 1 MiB): bounds memory


class AsyncWriter:
    def __init__(self, fd: int):
        self.fd = fd
        self._queue: queue.Queue[tuple[memoryview, int] | None] = queue.Queue(MAX_IN_FLIGHT)
        self._thread = threading.Thread(target=self._run, name="cove-pf-writer", daemon=True)
        self._error: OSError | None = None
        self.pending = False
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                view, offset = item
                if self._error is None:
                    try:
                        while view:
                            written = os.pwrite(self.fd, view, offset)
                            view, offset = view[written:], offset + written
                    except OSError as exc:
                        self._error = exc
            finally:
                self._queue.task_done()

    def write(self, view: memoryview, offset: int) -> None:
        self.pending = True
        self._queue.put((view, offset))

    def drain(self) -> None:
        """Wait until every queued write is done; raise the first error one met."""
        if self.pending:
            self._queue.join()
            self.pending = False
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._queue.put(None)
            self._thread.join()
