"""kill -9 of a volume writer at a random instant leaves the last committed volume or the new one.

Each run fills a volume, starts a writer subprocess that creates, writes,
truncates, renames and unlinks files and commits the volume now and then
(with a tiny node cache, so dirty nodes reach the disk between commits),
kills it after a random delay, then opens the volume, compares its whole
state (names and contents) with the states the writer logged, and reads
every file through its MAC tree.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cove.fs.index import KeyPolicy
from cove.fs.volume import Volume
from cove.fs.volume_format import NEXT

sys.path.insert(0, str(Path(__file__).parent))
from vol_crash_writer import state_digest  # noqa: E402

WRITER = str(Path(__file__).parent / "vol_crash_writer.py")
RUNS = 110


@pytest.fixture(autouse=True)
def platform(tmp_path, monkeypatch):
    monkeypatch.setenv("COVE_PLATFORM_DIR", str(tmp_path / "platform"))


def allowed_states(log: str) -> set[str]:
    lines = [ln.split() for ln in log.splitlines() if ln.strip() and ln != "ready"]
    committed = [ln[1] for ln in lines if ln[0] == "commit"]
    allowed = {committed[-1]}
    if lines[-1][0] == "begin":
        allowed.add(lines[-1][1])
    return allowed


def run_once(tmp: Path, rng: random.Random, i: int) -> tuple[bool, bool]:
    path = tmp / f"v{i}"
    log = tmp / f"v{i}.log"
    key = os.urandom(16)
    with Volume.create(path, key, label="/crash", policy=KeyPolicy.of("file:/k"), anchor="file") as volume:
        for j in range(rng.randrange(0, 5)):
            volume.write_file(f"/d1/f{j}" if j % 2 else f"/f{j}", rng.randbytes(rng.randrange(0, 300_000)))
        volume.commit()
        log.write_text(f"commit {state_digest(volume)}\n")
    durable = "1" if i % 4 == 0 else "0"
    cache = str(rng.choice([8, 16, 64]) * 4096)
    proc = subprocess.Popen([sys.executable, WRITER, str(path), key.hex(), str(log), str(i), cache, durable])
    try:
        deadline = time.monotonic() + 30
        while "ready" not in log.read_text():
            assert proc.poll() is None, f"writer exited early with {proc.returncode}"
            assert time.monotonic() < deadline, "writer did not start"
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.4))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    text = log.read_text()
    interrupted = os.path.exists(path / NEXT) or any(
        name.endswith(".gramine.recovery") for _, _, names in os.walk(path) for name in names
    )
    with Volume.open(path, key, label="/crash") as volume:
        assert volume.problems == [], f"run {i}: {volume.problems}"
        assert state_digest(volume) in allowed_states(text), f"run {i}: neither committed nor new state"
        assert volume.verify() == []
        volume.write_file("/after-crash", b"still writable")
    with Volume.open(path, key) as volume:
        assert volume.read_file("/after-crash") == b"still writable"
    return interrupted, text.count("commit") > 1


def test_kill_9_leaves_a_committed_volume(tmp_path):
    rng = random.Random(7)
    interrupted = progressed = 0
    for i in range(RUNS):
        mid, moved = run_once(tmp_path, rng, i)
        interrupted += mid
        progressed += moved
    # the suite must really have killed writers mid-commit and after commits
    assert interrupted >= 10, f"only {interrupted} runs were killed with a commit or a log pending"
    assert progressed >= RUNS // 2, f"only {progressed} runs committed anything"
