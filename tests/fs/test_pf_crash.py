"""kill -9 at a random instant leaves the last committed state or the new one.

Each run starts a writer subprocess that makes random writes, truncations and
commits on a file with prior content (so overwrites need the undo log) and a
small node cache (so dirty nodes are written back between commits), kills it
after a random delay, then opens the file and compares it with the states the
writer logged.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from cove.fs import ProtectedFile

WRITER = str(Path(__file__).parent / "pf_crash_writer.py")
RUNS = 120


def allowed_states(log: str) -> set[str]:
    lines = [ln.split() for ln in log.splitlines() if ln.strip() and ln != "ready"]
    committed = [ln[1] for ln in lines if ln[0] == "commit"]
    allowed = {committed[-1]}
    if lines[-1][0] == "begin":
        allowed.add(lines[-1][1])
    return allowed


def run_once(tmp: Path, rng: random.Random, i: int) -> tuple[bool, bool]:
    host = str(tmp / f"f{i}.pf")
    log = tmp / f"f{i}.log"
    key = os.urandom(16)
    initial = rng.randbytes(rng.randrange(0, 450_000))
    with ProtectedFile.open(host, key, "crash/file", "w") as f:
        f.write(0, initial)
    log.write_text(f"commit {hashlib.sha256(initial).hexdigest()}\n")
    durable = "1" if i % 4 == 0 else "0"
    cache = str(rng.choice([8, 16, 64, 1024]) * 4096)
    proc = subprocess.Popen([sys.executable, WRITER, host, key.hex(), str(log), str(i), durable, cache])
    try:
        deadline = time.monotonic() + 30
        while "ready" not in log.read_text():
            assert proc.poll() is None, f"writer exited early with {proc.returncode}"
            assert time.monotonic() < deadline, "writer did not start"
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.25))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    text = log.read_text()
    pending = os.path.exists(host + ".gramine.recovery") and open(host, "rb").read(59)[58] & 1
    with ProtectedFile.open(host, key, "crash/file", "r") as f:
        digest = hashlib.sha256(f.read(0, f.size())).hexdigest()
    assert digest in allowed_states(text), f"run {i}: state is neither committed nor new"
    with ProtectedFile.open(host, key, "crash/file", "r+") as f:  # still writable
        f.write(0, b"after crash")
    return bool(pending), text.count("commit") > 1


def test_kill_9_leaves_a_committed_state(tmp_path):
    rng = random.Random(2024)
    recovered = progressed = 0
    for i in range(RUNS):
        pending, moved = run_once(tmp_path, rng, i)
        recovered += pending
        progressed += moved
    # the suite must really have killed writers mid-transaction and after commits
    assert recovered >= 5, f"only {recovered} runs needed recovery"
    assert progressed >= RUNS // 2, f"only {progressed} runs committed anything"
