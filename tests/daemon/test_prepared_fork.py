"""cove.runtime.sim.Prepared's child runs Python between its fork and its exec: it must take no lock
another thread may have held at the fork. The case a test can force: the collector. Garbage pending at
the fork whose finalizer takes a lock held at the fork (a file's flush and its buffer's lock, say)
deadlocked the child if a collection ran in it; the collector is now off across the fork and in the
child, so the child starts. Threads holding logging's and an importing module's locks are there too.
"""

from __future__ import annotations

import subprocess
import sys

# each collection in the parent leaves new garbage behind, so some is always pending at the fork; a
# finalizer run in any other process takes a lock that was held at the fork (and is for ever in a child)
SCRIPT = r"""
import gc, logging, os, sys, threading
from cove.config import ResourcesSection
from cove.runtime import sim

PARENT, held, chain = os.getpid(), threading.Lock(), [True]
held.acquire()

class Garbage:
    def __init__(self):
        self.me = self
    def __del__(self):
        if os.getpid() != PARENT:
            held.acquire()  # a collection in the child: it never gets further
        elif chain[0]:
            Garbage()

handler, importing, release = logging.StreamHandler(), threading.Event(), threading.Event()
handler.acquire()  # logging's lock, held by this thread at the fork
sys.path.insert(0, sys.argv[1])
with open(os.path.join(sys.argv[1], "slow_module.py"), "w") as module:
    module.write("import sys\nsys.modules['__main__'].importing.set()\nsys.modules['__main__'].release.wait()\n")
threading.Thread(target=lambda: __import__("slow_module"), daemon=True).start()  # its module lock held
importing.wait()
gc.set_threshold(1)
Garbage()
child = sim.prepare(ResourcesSection())
gc.set_threshold(700)
assert child is not None, "no cgroup on this host: the start is not prepared here"
assert gc.isenabled()  # the parent's collector is back on
started = child.start(["/bin/true"], {})
chain[0] = False
assert started is not None and child.wait() == 0, child.returncode
release.set()
print("started")
"""


def test_the_prepared_child_starts_whatever_the_parent_threads_held(tmp_path):
    try:
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        raise AssertionError("the prepared child deadlocked between its fork and its exec") from None
    assert (result.returncode, result.stdout) == (0, "started\n"), result.stderr
