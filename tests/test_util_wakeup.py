"""cove.util.Wakeup: the flag a signal handler may set (threading.Event's set could wait forever there)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

from cove.util import Wakeup

LOOP = """
import signal
from cove.util import Wakeup
stop, reload = Wakeup(), Wakeup()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
signal.signal(signal.SIGHUP, lambda *_: reload.set())
print("ready", flush=True)
reloads = 0
while not stop.wait(0.00001):
    if reload.is_set():
        reload.clear()
        reloads += 1
print(reloads, flush=True)
"""


def test_signals_set_it_wherever_they_land():
    """A loop that waits microseconds and clears its reload flag, signalled at random moments, always ends."""
    loops = [subprocess.Popen([sys.executable, "-c", LOOP], stdout=subprocess.PIPE) for _ in range(6)]
    try:
        for loop in loops:
            assert loop.stdout is not None and loop.stdout.readline() == b"ready\n"
        for _ in range(20):
            for loop in loops:
                loop.send_signal(signal.SIGHUP)
            time.sleep(0.002)
        for loop in loops:
            loop.send_signal(signal.SIGTERM)
        for loop in loops:
            assert loop.wait(timeout=20) == 0, "the loop did not end"
            assert loop.stdout is not None and int(loop.stdout.read()) >= 1, "no reload was seen"
    finally:
        for loop in loops:
            if loop.poll() is None:
                loop.kill()
                loop.wait()


def test_set_clear_and_wait():
    flag = Wakeup()
    try:
        began = time.monotonic()
        assert flag.wait(0.05) is False and time.monotonic() - began >= 0.04
        threading.Timer(0.05, flag.set).start()
        assert flag.wait(10) is True and flag.is_set()
        assert flag.wait(0) is True  # stays set, every waiter wakes
        flag.clear()
        assert not flag.is_set() and flag.wait(0) is False
        for _ in range(100_000):  # more wakeups than the pipe holds: set never blocks
            flag.set()
        flag.clear()
        assert flag.wait(0) is False
    finally:
        flag.close()
