"""kill -9 of the FUSE server or of the program inside the enclave, at random points.

A writer inside the enclave replaces files atomically (write a temporary
file, fsync, rename) and overwrites small parts in place (pwrite, fsync),
logging each durable step; the test kills the secure file system's server,
or the writer, after a random delay. Afterwards the volume must open with no
problem, and every file must hold the content of its last completed step or
of the step in flight, never anything else. SQLite (Python's sqlite3 inside
the enclave) gets the same treatment and must pass PRAGMA integrity_check
with every committed transaction present.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cove.fs.volume import Volume
from tests.conftest import COVE
from tests.fs.securefs_enclave import PYTHON, make_python_enclave, mount_block, platform_env

FILE_RUNS = (70, 35)  # (server killed, writer killed)
SQLITE_RUNS = (20, 10)


@pytest.fixture(scope="module")
def enclave(cove, tmp_path_factory):
    base = tmp_path_factory.mktemp("securefs-crash")
    app = make_python_enclave(cove, base, platform_env(base), name="crashapp")
    key = base / "volume.key"
    key.write_bytes(os.urandom(16))
    app.key = key.read_bytes()
    app.configure(mount_block(key=f"file:{key}", options='rollback = "file"'))
    return app


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found.append(child)
            todo.append(child)
    return found


def _find(pid: int, needle: bytes) -> int | None:
    for child in _descendants(pid):
        try:
            if needle in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
        except OSError:
            continue
    return None


def _workers(pid: int) -> list[int]:
    """The run's processes but the cleanup helpers a server leaves (its mount watcher, a fork of it, and
    fusermount3's auto_unmount helper): an OOM kill does not pick them, a kill of a process group does
    not reach them (each has a session of its own)."""
    found = []
    for child in _descendants(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
            parent = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1])
            parent_command = Path(f"/proc/{parent}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if command.startswith(b"fusermount") or command == parent_command:
            continue
        found.append(child)
    return found


def run_and_kill(enclave, args: list[str], victim: str, delay: float) -> list[str]:
    """Start the probe in the enclave, wait for 'ready', kill the victim after delay; stdout lines."""
    env = dict(enclave.cove.env, **enclave.env)
    proc = subprocess.Popen(
        [COVE, "run", PYTHON, "/app/enclave_fsprobe.py", *args],
        cwd=enclave.root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lines: list[str] = []
    ready = threading.Event()

    def reader() -> None:
        for raw in proc.stdout:
            lines.append(raw.decode().strip())
            if lines[-1].startswith("ready"):
                ready.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        assert ready.wait(60), f"the writer did not start: {proc.stderr.read1().decode()}"
        time.sleep(delay)
        needle = b"cove.fs.server" if victim == "server" else b"enclave_fsprobe.py"
        target = _find(proc.pid, needle)
        assert target is not None, f"no {victim} process to kill"
        os.kill(target, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        thread.join(timeout=10)
    return lines


def allowed(lines: list[str], known: dict[str, str]) -> dict[str, set[str]]:
    """Per file: its last completed state, plus the state of a step in flight."""
    last: dict[str, str] = dict(known)
    pending: dict[str, str] = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and parts[0] in ("begin", "commit"):
            if parts[0] == "begin":
                pending[parts[1]] = parts[2]
            else:
                last[parts[1]] = parts[2]
                pending.pop(parts[1], None)
    return {
        name: {last.get(name, "absent")} | ({pending[name]} if name in pending else set())
        for name in set(last) | set(pending)
    }


def volume_state(enclave, monkeypatch) -> tuple[dict[str, str], list[str]]:
    monkeypatch.setenv("COVE_PLATFORM_DIR", enclave.env["COVE_PLATFORM_DIR"])
    with Volume.open(enclave.state / "data", enclave.key, label="/data") as volume:
        state = {}
        for path, node in volume.walk():
            if node.kind == "f" and not path.endswith(".tmp"):
                state[path.lstrip("/")] = hashlib.sha256(volume.read_file(path)).hexdigest()
        return state, volume.problems + volume.verify()


def test_files_survive_kill_9_of_the_server_or_the_writer(enclave, monkeypatch):
    enclave.reset_state()
    rng = random.Random(11)
    known: dict[str, str] = {}
    victims = ["server"] * FILE_RUNS[0] + ["writer"] * FILE_RUNS[1]
    rng.shuffle(victims)
    moved = 0
    for i, victim in enumerate(victims):
        lines = run_and_kill(enclave, ["writer", "/data", str(i)], victim, rng.uniform(0, 1.2))
        state, problems = volume_state(enclave, monkeypatch)
        assert problems == [], (i, victim, problems)
        for name, options in allowed(lines, known).items():
            assert state.get(name, "absent") in options, (i, victim, name)
        assert set(state) <= {f"f{k}" for k in range(5)}
        moved += any(line.startswith("commit") for line in lines)
        known = state
    assert moved >= len(victims) // 2, f"only {moved} runs completed a step before the kill"


def test_sqlite_survives_kill_9_and_passes_integrity_check(enclave, monkeypatch):
    enclave.reset_state()
    rng = random.Random(5)
    committed = 0
    victims = ["server"] * SQLITE_RUNS[0] + ["writer"] * SQLITE_RUNS[1]
    rng.shuffle(victims)
    for i, victim in enumerate(victims):
        lines = run_and_kill(enclave, ["sqlite-writer", "/data/db.sqlite"], victim, rng.uniform(0.1, 1.5))
        assert lines[0] == f"ready {committed}" or committed == 0 and lines[0] == "ready 0", (i, lines[:2])
        commits = [int(line.split()[1]) for line in lines if line.startswith("commit")]
        begins = [int(line.split()[1]) for line in lines if line.startswith("begin")]
        report = enclave.probe_json("sqlite-check", "/data/db.sqlite")
        assert report["integrity"] == ["ok"], (i, victim, report)
        last = commits[-1] if commits else committed
        allowed_max = {last} | ({begins[-1]} if begins and begins[-1] > last else set())
        assert report["max"] in allowed_max, (i, victim, report, last, begins[-1:])
        committed = report["max"]
    assert committed >= 30, f"only {committed} transactions committed in all runs"
    _, problems = volume_state(enclave, monkeypatch)
    assert problems == []


@pytest.mark.parametrize("victims", ["launcher and volume server", "every process of the run"])
def test_kill_9_leaves_no_mount(enclave, tmp_path, victims):
    """They die at once (a machine-wide OOM kill, `kill -9` of the process group): nobody is left to
    unmount, so each mount (the volume's and /dev/attestation's) must go with its server, never stay as a
    dead mount. Under load, fusermount3's auto_unmount alone missed about one in three."""
    enclave.reset_state()
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    env = dict(enclave.cove.env, **enclave.env, COVE_RUNTIME_DIR=str(runtime))
    proc = subprocess.Popen(
        [COVE, "run", PYTHON, "/app/enclave_fsprobe.py", "writer", "/data", "0"],
        cwd=enclave.root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"ready"), "the writer did not start"
        mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(runtime) in line]
        assert any("/securefs-" in line for line in mounts), "no volume mount to lose"
        assert any("cove-attestation" in line for line in mounts), "no /dev/attestation mount to lose"
        server = _find(proc.pid, b"cove.fs.server")
        assert server is not None, "no server process to kill"
        targets = [proc.pid, server] if victims.startswith("launcher") else [proc.pid, *_workers(proc.pid)]
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def mounts_left() -> list[str]:
        return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(runtime) in line]

    deadline = time.monotonic() + 30
    while left := mounts_left():
        assert time.monotonic() < deadline, f"a dead FUSE mount stayed in the runtime folder: {left}"
        time.sleep(0.1)
