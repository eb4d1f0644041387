"""The supervisor's log writer starts without waiting to be scheduled, and still drains everything by finish()."""

from __future__ import annotations

import os
import sys
import threading

from cove.daemon import logfile


class Marked(logfile.Writer):
    ran = threading.Event()

    def _run(self) -> None:
        self.ran.set()
        super()._run()


def test_start_returns_before_the_thread_runs_and_finish_waits_for_it(tmp_path):
    """threading.Thread.start waits until the new thread runs: with the interpreter's switch interval
    longer than the test, this thread keeps the GIL after start() unless start() waits (it did)."""
    read, write = os.pipe()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(30)
    try:
        writer = Marked(read, tmp_path / "log", logfile.MIN_BYTES, 2).start()
        ran_at_start = writer.ran.is_set()  # no blocking call between start() and this look
    finally:
        sys.setswitchinterval(interval)
    assert not ran_at_start
    for i in range(200):  # past one file: rotated while this writes
        os.write(write, b"line %d of the log writer's test\n" % i)
    os.close(write)
    writer.finish()
    assert writer.done.is_set() and writer.ran.is_set()
    kept = (tmp_path / "log.1").read_bytes() + (tmp_path / "log").read_bytes()
    assert kept.endswith(b"line 199 of the log writer's test\n") and len(kept) <= 2 * logfile.MIN_BYTES
