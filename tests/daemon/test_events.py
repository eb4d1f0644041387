"""`cove events` across a daemon restart: a bounded journal, the same numbers, exits seen while no daemon ran."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from cove.daemon.events import Events
from tests.daemon.test_orphans import enclave_of, leftovers


def test_journal_is_bounded_and_read_back(tmp_path):
    journal = tmp_path / "events.jsonl"
    events = Events(journal, max_bytes=4096)
    for number in range(300):
        events.emit("enclave", "start", f"{number:064x}", name=f"e{number}")
    events.close()
    files = [journal, journal.with_name("events.jsonl.1")]
    assert all(f.stat().st_size <= 4096 for f in files)
    assert oct(journal.stat().st_mode & 0o777) == "0o600"
    # a torn last line (a kill in the middle of a write) and a foreign line are skipped
    with open(journal, "ab") as handle:
        handle.write(b'not json\n[1, 2]\n{"seq": "7"}\n{"seq": 3, "id": "old"}\n{"seq": 301, "type": "enc')
    again = Events(journal, max_bytes=4096)
    seqs = [e["seq"] for e in again.after(0)]
    assert seqs == list(range(seqs[0], 301)) and seqs[0] > 1  # the newest, in order, nothing invented
    assert again.next == 301
    event = again.emit("image", "import", "x")
    assert event["seq"] == 301
    again.close()
    assert json.loads(journal.read_bytes().splitlines()[-1])["seq"] == 301  # on a line of its own
    assert Events(journal).after(300)[0]["action"] == "import"


def _events(node, since: int = 0) -> list[dict]:
    return [
        json.loads(line)
        for line in node.cove.ok("events", "--since", str(since), "--no-follow").stdout.splitlines()
        if line.strip()
    ]


def _state(node, ident: str) -> dict:
    try:
        return json.loads((Path(node.root) / "enclaves" / ident / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def test_events_survive_kill_9_of_the_daemon(node, app):
    c = node.cove
    ends = c.ok("run", "-d", "--name", "ev-ends", "/bin/hello", "2", "4", cwd=app).stdout.strip()
    killed = c.ok("run", "-d", "--name", "ev-killed", "/bin/hello", "100", cwd=app).stdout.strip()
    node.until(killed, "running")
    before = _events(node)
    last = before[-1]["seq"]
    assert {(e["action"], e["id"]) for e in before} >= {("create", ends), ("start", ends), ("start", killed)}
    node.kill9()
    # while no daemon runs: one enclave ends by itself, the other's supervisor is killed
    supervisor = _state(node, killed)["pid"]
    groups = enclave_of(supervisor)[1]
    os.kill(supervisor, signal.SIGKILL)
    assert groups and leftovers([supervisor], set(), within=5) == {}  # the enclave ends with its supervisor
    deadline = time.monotonic() + 30
    while _state(node, ends).get("state") != "exited":
        assert time.monotonic() < deadline, _state(node, ends)
        time.sleep(0.05)
    node.start()
    deadline = time.monotonic() + 30
    while not {ends, killed} <= {e["id"] for e in _events(node, last) if e["action"] == "die"}:
        assert time.monotonic() < deadline, _events(node, last)
        time.sleep(0.1)
    after = _events(node)
    assert after[: len(before)] == before  # the same events, the same numbers
    new = _events(node, last)
    assert all(e["seq"] > last for e in new) and [e["seq"] for e in new] == sorted(e["seq"] for e in new)
    codes = {e["id"]: e["exit_code"] for e in new if e["action"] == "die"}
    assert codes == {ends: 4, killed: 137}
    assert len([e for e in new if e["action"] == "die"]) == 2  # once each, not again at the next look
    c.ok("rm", "ev-ends", "ev-killed")
    assert leftovers([supervisor], groups, within=5) == {}  # and the restarted daemon removed its cgroups
    node.stop()
    node.start()  # a clean restart: no die is invented, removed enclaves stay removed
    time.sleep(1.2)
    assert [e["action"] for e in _events(node, _events(node)[-1]["seq"] - 2)] == ["remove", "remove"]


class _Seen:
    """An enclave as watch() reads it from the registry: id, name, status and its state file."""

    def __init__(self, ident: str, status: str, restarts: int, exit_code: int | None = None) -> None:
        self.id, self.name, self.status = ident, "n-" + ident[:4], status
        self.state = {"restarts": restarts, "exit_code": exit_code}
        self.record = {"uid": 0}


class _Folders:
    def __init__(self, enclaves: list[_Seen]) -> None:
        self.enclaves = enclaves

    def all(self) -> list[_Seen]:
        return self.enclaves


def test_changes_while_down_are_compared_with_the_journal(tmp_path):
    from cove.daemon.events import notice

    journal = tmp_path / "events.jsonl"
    first = Events(journal)
    for ident in ("a" * 64, "b" * 64, "c" * 64, "d" * 64):
        first.emit("enclave", "start", ident, name=ident[:4])
    first.emit("enclave", "die", "c" * 64, exit_code=0, restarts=0)
    first.emit("enclave", "remove", "d" * 64)
    first.close()
    again = Events(journal)
    folders = _Folders(
        [_Seen("a" * 64, "running", 2, 1), _Seen("b" * 64, "exited", 0, 9), _Seen("c" * 64, "exited", 0, 0)]
    )
    notice(folders, again)
    new = again.after(6)
    assert [(e["action"], e["id"][0], e.get("restarts"), e.get("exit_code")) for e in new] == [
        ("restart", "a", 2, 1),
        ("die", "b", 0, 9),
    ]  # c had died already: no second die
    notice(folders, again)
    assert again.after(6) == new  # nothing new at the next look


@pytest.mark.parametrize(
    "line",
    [b"[" * 100_000, b'{"seq": 2} trailing', b"[2]", b'{"seq": "2"}'],
    ids=["deep-nesting", "trailing-garbage", "wrong-top-level-type", "wrong-field-type"],
)
def test_hostile_journal_lines_are_skipped(tmp_path, line):
    """A foreign line is skipped, never stops the daemon's start (deep nesting used to: RecursionError)."""
    journal = tmp_path / "events.jsonl"
    journal.write_bytes(b'{"seq": 1, "type": "image"}\n' + line + b'\n{"seq": 3, "type": "image"}\n')
    events = Events(journal)
    assert [e["seq"] for e in events.after(0)] == [1, 3]
    events.close()
