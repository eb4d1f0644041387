"""The daemon's side of an attached `cove run`, kept off the start's critical path.

Its end is sent before the enclave's folder is deleted, never before it is unlisted: deleting the folder
(record, state, log) took milliseconds; the daemon now renames it out of the registry (the name freed,
`cove ps -a` without it), sends the end, then deletes it. A daemon killed in between leaves the renamed
folder in incoming/, which the next one deletes. And while the supervisor's pidfd says it runs, the
follower does not read the enclave's record and state every few milliseconds (CPU the start needs).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

from cove.daemon.client import ENDED, FRAME_HEADER, STARTED
from cove.daemon.registry import Registry
from cove.daemon.server import Daemon
from cove.runtime.procfs import process_start

RECORD = {k: None for k in ("image", "measurement", "signer", "backend", "program", "instance", "restart")}


def ended_enclave(registry: Registry, name: str):
    """A registered enclave whose supervisor wrote its end and exited."""
    enclave = registry.create(dict(RECORD, args=[], uid=0, attached=True, name=name))
    gone = subprocess.Popen(["true"])
    gone.wait()
    state = {"pid": gone.pid, "pid_start": None, "state": "exited", "exit_code": 3, "error": None}
    (enclave.folder / "state.json").write_text(json.dumps(state))
    (enclave.folder / "log").write_bytes(b"the output\n")
    return enclave


def kind(frame: bytes) -> int:
    return FRAME_HEADER.unpack(frame[: FRAME_HEADER.size])[0]


@pytest.mark.parametrize("client", ["reads on", "leaves after the end"])
def test_the_end_is_sent_unlisted_and_the_folder_deleted_after(tmp_path, client):
    daemon = Daemon(tmp_path / "root", str(tmp_path / "d.sock"), group="root")
    enclave = ended_enclave(daemon.registry, "short")
    frames = daemon.attach(daemon.registry.load(enclave.id).view(), 0)
    assert kind(next(frames)) == STARTED
    while kind(frame := next(frames)) != ENDED:
        pass
    assert json.loads(frame[FRAME_HEADER.size :])["exit_code"] == 3
    # when the client gets its end: unlisted, the name free, the folder renamed away and not yet deleted
    assert daemon.registry.all() == [] and not (daemon.registry.names / "short").is_symlink()
    doomed = daemon.registry.incoming / f"rm-{enclave.id}"
    assert (doomed / "log").exists() and not enclave.folder.exists()
    if client == "reads on":
        assert next(frames, None) is None
    else:
        frames.close()  # the handler closes the stream when its write of the end fails
    assert not doomed.exists()  # deleted either way


def test_a_folder_left_between_the_end_and_its_deletion_is_deleted_at_restart(tmp_path):
    registry = Registry(tmp_path)
    enclave = ended_enclave(registry, "killed-in-between")
    doomed = registry.remove(enclave, purge=False)  # what a daemon killed after sending the end leaves
    assert doomed.is_dir() and registry.all() == []
    registry.recover()
    assert not doomed.exists() and list(registry.incoming.iterdir()) == []


def test_rm_still_deletes_at_once(tmp_path):
    daemon = Daemon(tmp_path / "root", str(tmp_path / "d.sock"), group="root")
    enclave = ended_enclave(daemon.registry, "removed")
    assert daemon.remove("removed", False, 0)["id"] == enclave.id
    assert list(daemon.registry.incoming.iterdir()) == [] and not enclave.folder.exists()


def test_the_follower_reads_no_state_while_the_supervisor_runs(tmp_path, monkeypatch):
    daemon = Daemon(tmp_path / "root", str(tmp_path / "d.sock"), group="root")
    enclave = daemon.registry.create(dict(RECORD, args=[], uid=0, attached=True, name="long"))
    supervisor = subprocess.Popen(["sleep", "30"])  # stands for the supervisor: a pidfd can be had
    state = {"pid": supervisor.pid, "pid_start": process_start(supervisor.pid), "state": "running"}
    (enclave.folder / "state.json").write_text(json.dumps(dict(state, exit_code=None, error=None)))
    looks: list[float] = []
    real = Daemon._current
    monkeypatch.setattr(Daemon, "_current", lambda self, ident: (looks.append(time.monotonic()), real(self, ident))[1])
    frames: list[bytes] = []
    follower = threading.Thread(target=lambda: frames.extend(daemon.attach(daemon.registry.load(enclave.id).view(), 0)))
    follower.start()
    try:
        time.sleep(0.5)  # dozens of the follower's waits
        assert looks == [] and len(frames) == 1  # started, not a look at the state
        ended = dict(state, state="exited", exit_code=0, error=None)
        (enclave.folder / "state.json").write_text(json.dumps(ended))
    finally:
        supervisor.kill()
        supervisor.wait()
    follower.join(10)
    assert not follower.is_alive() and looks  # its exit woke the follower, which then looked
    assert [kind(f) for f in frames] == [STARTED, ENDED] and json.loads(frames[1][FRAME_HEADER.size :])[
        "exit_code"
    ] == 0
