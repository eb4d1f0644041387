"""Registry.settle: an end written just before the supervisor exits is not taken for a kill, whoever asks.

A supervisor writes how its enclave ended, then exits. A reader that read state.json before that write
and looked at the process after the exit recorded the enclave as killed (exit 137, "its supervisor was
killed"). The follower and `wait` read the state again; view, list and remove did not. Settling now
reads it again itself, once the supervisor is seen dead, so every caller gets the real end.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cove.daemon import registry as registry_mod
from cove.daemon.server import Daemon

RECORD = {k: None for k in ("image", "measurement", "signer", "backend", "program", "instance", "restart")}


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    return Daemon(tmp_path / "root", str(tmp_path / "d.sock"), group="root")


def dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def running_enclave(daemon: Daemon) -> tuple[registry_mod.Enclave, dict]:
    enclave = daemon.registry.create(dict(RECORD, args=[], uid=0))
    running = {"pid": dead_pid(), "pid_start": None, "state": "running", "exit_code": None, "error": None}
    (enclave.folder / "state.json").write_text(json.dumps(running))
    return enclave, running


def ask(daemon: Daemon, how: str, ident: str) -> dict:
    if how == "settle":
        return daemon.registry.settle(daemon.registry.load(ident)).view()
    if how == "view":
        return daemon.view(ident, 0)
    if how == "list":
        return next(v for v in daemon.list(True, 0) if v["id"] == ident)
    return daemon.remove(ident, False, 0)  # refused if it were still running: a clean end is removable


@pytest.mark.parametrize("how", ["settle", "view", "list", "remove"])
def test_an_end_written_between_the_read_and_the_look_is_not_a_kill(daemon, monkeypatch, how):
    enclave, running = running_enclave(daemon)
    looks = []

    def ends_meanwhile(self: registry_mod.Enclave) -> bool:  # it writes its end and exits between the looks
        if not looks:
            (self.folder / "state.json").write_text(json.dumps(dict(running, state="exited", exit_code=0)))
        looks.append(1)
        return False

    monkeypatch.setattr(registry_mod.Enclave, "supervisor_alive", ends_meanwhile)
    view = ask(daemon, how, enclave.id)
    assert (view["state"], view["exit_code"], view["error"]) == ("exited", 0, None)
    if how != "remove":
        assert json.loads((enclave.folder / "state.json").read_text())["exit_code"] == 0  # not overwritten


def test_a_supervisor_killed_without_a_word_is_still_a_kill(daemon):
    enclave, _ = running_enclave(daemon)
    view = daemon.view(enclave.id, 0)
    assert (view["state"], view["exit_code"], view["error"]) == ("exited", 137, "its supervisor was killed")
    assert json.loads((enclave.folder / "state.json").read_text())["exit_code"] == 137


def test_a_supervisor_replaced_meanwhile_is_not_settled(daemon, monkeypatch):
    """The state read again names a live supervisor (a restart in between): the enclave runs on."""
    enclave, running = running_enclave(daemon)
    live = subprocess.Popen(["sleep", "30"])
    try:
        real = registry_mod.Enclave.supervisor_alive
        looks = []

        def replaced_meanwhile(self: registry_mod.Enclave) -> bool:
            if not looks:
                (self.folder / "state.json").write_text(json.dumps(dict(running, pid=live.pid)))
                looks.append(1)
                return False
            return real(self)

        monkeypatch.setattr(registry_mod.Enclave, "supervisor_alive", replaced_meanwhile)
        view = daemon.view(enclave.id, 0)
        assert (view["state"], view["supervisor_pid"]) == ("running", live.pid)
    finally:
        live.kill()
        live.wait()
