"""`cove run` through the daemon in one request (the cove-attach/1 upgrade), and the sandbox prepared ahead.

The stream against a real daemon (frames, the removal at the end, a refusal before the switch, a client
that leaves), a daemon without the upgrade (the old calls), hostile streams from a fake daemon (one line,
exit 7), and cove.runtime.sim.Prepared on its own (its cgroups, its end when unused or refused).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import struct
import time
from pathlib import Path

import pytest

from cove.config import ResourcesSection
from cove.daemon.client import ENDED, OUTPUT, STARTED
from cove.errors import CoveError
from cove.runtime import limits, sim
from tests.conftest import error_line
from tests.daemon.test_fast_client import VERSION_OK, fake_daemon, http  # noqa: F401 - fake_daemon is a fixture

UPGRADE = "cove-attach/1"


def frame(kind: int, payload: bytes) -> bytes:
    return struct.pack(">B3sI", kind, b"\0\0\0", len(payload)) + payload


def attach(node, body: dict) -> tuple[bytes, socket.socket]:
    """Send the attach request; the answer's head and the socket, positioned after it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(node.socket)
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/enclaves HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: "
        + UPGRADE.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(data)).encode()
        + b"\r\n\r\n"
        + data
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, head
        head += chunk
    return head, sock


def read_frames(sock: socket.socket) -> list[tuple[int, bytes]]:
    stream = b""
    while chunk := sock.recv(65536):
        stream += chunk
    frames = []
    while stream:
        kind, pad, size = struct.unpack(">B3sI", stream[:8])
        assert pad == b"\0\0\0"
        frames.append((kind, stream[8 : 8 + size]))
        stream = stream[8 + size :]
    return frames


def cgroups_of(pid: int) -> list[Path]:
    """The enclave cgroups a supervisor (or launcher) made: cove-PID-* under this process's own groups."""
    parents = limits.parents()
    assert parents, "no cgroup hierarchy here to make enclave cgroups under"
    return [parent / name for parent in parents for name in os.listdir(parent) if name.startswith(f"cove-{pid}-")]


def test_one_request_streams_the_output_and_removes_the_enclave(node, app):
    head, sock = attach(node, {"instance": str(app), "program": "/bin/hello", "args": ["0", "3"]})
    with sock:
        assert head.startswith(b"HTTP/1.1 101 ") and b"Upgrade: cove-attach/1" in head, head
        frames = read_frames(sock)
    assert [k for k, _ in frames][0] == STARTED and frames[-1][0] == ENDED
    started, ended = json.loads(frames[0][1]), json.loads(frames[-1][1])
    assert started["id"] == ended["id"] and ended["state"] == "exited" and ended["exit_code"] == 3
    assert b"".join(p for k, p in frames if k == OUTPUT) == b"hello 3\nto stderr\n"
    assert {k for k, _ in frames[1:-1]} <= {OUTPUT}
    status, _ = node.api("GET", f"/v1/enclaves/{started['id']}")
    assert status == 404  # removed before the last frame, as `docker run --rm`
    assert cgroups_of(ended["supervisor_pid"]) == []  # the prepared sandbox's cgroups went with it


@pytest.mark.parametrize(
    "body, status",
    [
        ({"instance": "/nonexistent", "program": "/bin/hello"}, 404),
        ({"program": "/bin/hello"}, 400),
        ({"instance": "relative", "program": "/bin/hello"}, 400),
    ],
)
def test_a_refusal_comes_before_the_switch(node, body, status):
    head, sock = attach(node, body)
    with sock:
        assert head.startswith(f"HTTP/1.1 {status} ".encode()) and b"application/problem+json" in head, head


def test_clients_that_hang_up_leave_the_log_one_json_object_per_line(node):
    """Clients that close (or reset) the connection at once, or right after the head of a refusal: the
    daemon's stderr is its JSON log, so a fault outside a route is one line, never a traceback."""
    body = json.dumps({"program": "/bin/hello"}).encode()
    request = b"POST /v1/enclaves HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    for round in range(60):
        if round % 2:
            head, sock = attach(node, {"program": "/bin/hello"})
            assert head.startswith(b"HTTP/1.1 400 ")
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(node.socket)
            sock.sendall(request + request[: round % 40])  # a second request cut short
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    assert node.api("GET", "/v1/version")[0] == 200  # still answering
    for line in node.log.read_text().splitlines():
        assert isinstance(json.loads(line), dict), line


def test_a_client_that_leaves_stops_the_stream_not_the_enclave(node, app):
    head, sock = attach(node, {"instance": str(app), "program": "/bin/hello", "args": ["30"]})
    with sock:
        assert head.startswith(b"HTTP/1.1 101 ")
        kind, pad, size = struct.unpack(">B3sI", sock.recv(8, socket.MSG_WAITALL))
        ident = json.loads(sock.recv(size, socket.MSG_WAITALL))["id"]
        assert kind == STARTED
    try:
        assert node.until(ident, "running")["state"] == "running"
    finally:
        node.cove.ok("rm", "-f", ident)


def test_the_plain_run_uses_one_create(node, app):
    """The fast path's requests: the version, then the attached create; no logs, wait or delete."""
    before = node.log.read_text().count('"event": "request"')
    result = node.cove("run", "/bin/hello", "0", "5", cwd=app)
    assert (result.returncode, result.stdout) == (5, "hello 3\nto stderr\n"), result.stderr
    # a request's line is written once it is answered: the attached create's when its stream ends, which may
    # be just after the client has its end frame and exits (so wait for it), and the fixture's last readiness
    # check (GET /v1/version) may land after the count above
    deadline = time.monotonic() + 20
    while True:
        lines = node.log.read_text().splitlines()
        requests = [json.loads(line) for line in lines if '"event": "request"' in line][before:]
        seen = [(r["method"], r["path"], r["status"]) for r in requests]
        if ("POST", "/v1/enclaves", 101) in seen or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    version, create = ("GET", "/v1/version", 200), ("POST", "/v1/enclaves", 101)
    assert seen[-2:] == [version, create] and set(seen[:-2]) <= {version}, seen


ENCLAVE = {"id": "ab" * 32, "name": "x", "state": "running"}


def test_a_daemon_without_the_upgrade_is_followed_the_old_way(cove, app, fake_daemon):  # noqa: F811
    path, script = fake_daemon
    ended = dict(ENCLAVE, state="exited", exit_code=3, error=None)
    script.extend(
        [
            VERSION_OK,
            http("201 Created", json.dumps(ENCLAVE).encode()),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nhello\n\r\n0\r\n\r\n",
            http("200 OK", json.dumps(ended).encode()),
            http("200 OK", json.dumps(ended).encode()),
        ]
    )
    result = cove("run", "/bin/hello", cwd=app, env={"COVE_DAEMON_SOCKET": path})
    assert (result.returncode, result.stdout, result.stderr) == (3, "hello\n", "")
    assert script == []  # logs, wait and remove were asked for


SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: cove-attach/1\r\n\r\n"
START = frame(STARTED, json.dumps(ENCLAVE).encode())


@pytest.mark.parametrize(
    "stream, code, line, out",
    [
        (SWITCH, 7, "broke off (the stream ended before the enclave did)", ""),
        (SWITCH.replace(b"cove-attach/1", b"cove-exec/1"), 7, "another protocol", ""),
        (SWITCH + frame(9, b"x"), 7, "a malformed frame", ""),
        (SWITCH + START[:5], 7, "broke off", ""),
        (SWITCH + struct.pack(">B3sI", STARTED, b"\0\0\0", 1 << 31), 7, "a malformed frame", ""),
        (SWITCH + struct.pack(">B3sI", STARTED, b"\0\1\0", 2) + b"{}", 7, "a malformed frame", ""),
        (SWITCH + frame(STARTED, b"not json"), 7, "not an enclave", ""),
        (SWITCH + frame(STARTED, b"[" * 100000), 7, "not an enclave", ""),
        (SWITCH + frame(ENDED, json.dumps(ENCLAVE).encode()), 7, "does not begin with the enclave", ""),
        (SWITCH + START + frame(OUTPUT, b"hi\n"), 7, "broke off", "hi\n"),
        (SWITCH + START + START, 7, "sent the enclave twice", ""),
        (SWITCH + START + frame(ENDED, b'{"id": 5}'), 7, "not an enclave", ""),
        (SWITCH + START + frame(OUTPUT, b"hi\n") + frame(ENDED, b'{"id": "a", "exit_code": 5}'), 5, None, "hi\n"),
        (SWITCH + START + frame(ENDED, b'{"id": "a", "exit_code": 1, "error": "no\\nway"}'), 1, "no way", ""),
        (SWITCH + START + frame(ENDED, b'{"id": "a", "exit_code": true}'), 125, None, ""),
    ],
)
def test_a_hostile_attach_stream_is_one_line(cove, app, fake_daemon, stream, code, line, out):  # noqa: F811
    path, script = fake_daemon
    script.extend([VERSION_OK, stream])
    result = cove("run", "/bin/hello", cwd=app, env={"COVE_DAEMON_SOCKET": path})
    assert (result.returncode, result.stdout) == (code, out), result.stderr
    assert "Traceback" not in result.stderr
    if line is not None:
        assert line in error_line(result)
    else:
        assert result.stderr == ""


def test_prepared_child_joins_its_cgroups_and_leaves_when_unused():
    """sim.prepare: a child in new cgroups with the limits asked; discarded, nothing is left."""
    child = sim.prepare(ResourcesSection(memory=96 << 20, max_processes=7))
    assert child is not None, "no cgroup on this host: the start is not prepared here"
    try:
        groups = child.limits.groups
        deadline = time.monotonic() + 10
        while str(child.pid) not in (groups[-1] / "cgroup.procs").read_text().split():
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.005)
        values = {p.name: p.read_text().strip() for g in groups for p in g.iterdir() if p.name in LIMIT_FILES}
        assert values.get("pids.max") == "7" and str(96 << 20) in {values.get(n) for n in LIMIT_FILES}
    finally:
        sim.discard_prepared()
    assert child.returncode == 0  # it read the end of its pipe and left
    assert not any(group.exists() for group in groups)


LIMIT_FILES = ("pids.max", "memory.limit_in_bytes", "memory.max")


def test_prepared_child_that_cannot_start_says_why(tmp_path: Path):
    child = sim.prepare(ResourcesSection())
    assert child is not None
    try:
        with pytest.raises(CoveError, match="could not be prepared: No such file"):
            child.start([str(tmp_path / "missing")], {})
        assert child.returncode == 127
    finally:
        sim.discard_prepared()
    assert not any(group.exists() for group in child.limits.groups)


def _pipes(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("pipe:"):
            found.add(target)
    return found


def ready_supervisors(node) -> list[int]:
    """The supervisors the node's spawner forked ahead: each reads a pipe only the spawner writes."""
    spawner = [p for p in _children(node.process.pid) if b"cove.daemon.spawner" in _cmdline(p)]
    assert len(spawner) == 1, spawner
    ends = _pipes(spawner[0]) - _pipes(node.process.pid)  # not the daemon's request pipe
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != spawner[0]:
            try:
                if b"cove.daemon.spawner" in _cmdline(int(entry.name)) and _pipes(int(entry.name)) & ends:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def test_a_supervisor_waits_forked_ahead_and_a_lost_one_is_replaced(node, app):
    """One supervisor waits, forked, for the next start; killed, the start forks one then, and a new
    one waits again."""
    deadline = time.monotonic() + 10
    while len(ready := ready_supervisors(node)) != 1:
        assert time.monotonic() < deadline, ready
        time.sleep(0.05)
    assert cgroups_of(ready[0]), "it prepared no sandbox while it waited"
    os.kill(ready[0], 9)
    result = node.cove("run", "/bin/hello", "0", "4", cwd=app)
    assert (result.returncode, result.stdout) == (4, "hello 3\nto stderr\n"), result.stderr
    deadline = time.monotonic() + 10
    while (now := ready_supervisors(node)) in ([], ready) or cgroups_of(ready[0]):
        assert time.monotonic() < deadline, (now, cgroups_of(ready[0]))  # its sandbox's child left, groups reaped
        time.sleep(0.05)
    assert len(now) == 1


def test_an_end_written_between_the_read_and_the_look_is_not_a_kill(tmp_path, monkeypatch):
    """A supervisor writes how its enclave ended, then exits. A follower that read the state before that
    write and looked at the process after the exit called it killed (exit 137, "its supervisor was
    killed"): about one `cove run` in a hundred on a loaded machine. It now reads the state again."""
    from cove.daemon import registry as registry_mod
    from cove.daemon.server import Daemon

    daemon = Daemon(tmp_path / "root", str(tmp_path / "d.sock"), group="root")
    record = {k: None for k in ("image", "measurement", "signer", "backend", "program", "instance", "restart")}
    enclave = daemon.registry.create(dict(record, args=[], uid=0))
    gone = subprocess.Popen(["true"])
    gone.wait()
    running = {"pid": gone.pid, "pid_start": None, "state": "running", "exit_code": None, "error": None}
    (enclave.folder / "state.json").write_text(json.dumps(running))

    looks = []

    def ends_meanwhile(self) -> bool:  # the supervisor writes its end and exits between the two looks
        if not looks:
            (self.folder / "state.json").write_text(json.dumps(dict(running, state="exited", exit_code=0)))
        looks.append(1)
        return False

    monkeypatch.setattr(registry_mod.Enclave, "supervisor_alive", ends_meanwhile)
    view = daemon.wait(enclave.id, 0)
    assert (view["state"], view["exit_code"], view["error"]) == ("exited", 0, None)


def test_an_enclave_gets_its_own_limits_whatever_was_prepared(node, app, hello, tmp_path):
    """The waiting supervisor prepared its sandbox with the last image's limits; an image asking others
    gets a sandbox prepared with its own verified ones (and the next one its limits again)."""
    from tests.daemon.conftest import make_hello_instance

    small = make_hello_instance(node.cove, tmp_path, hello, "small")
    toml = (small / "cove.toml").read_text()
    toml = toml.replace('memory = "512M"', 'memory = "96M"').replace("max_processes = 64", "max_processes = 9")
    (small / "cove.toml").write_text(toml)
    node.cove.ok("build", cwd=small)
    for instance, wanted in ((app, ("64", 512 << 20)), (small, ("9", 96 << 20)), (app, ("64", 512 << 20))):
        ident = node.cove.ok("-C", str(instance), "run", "-d", "/bin/hello", "30").stdout.strip()
        try:
            view = node.until(ident, "running")
            groups = cgroups_of(view["supervisor_pid"])
            found = {p.name: p.read_text().strip() for g in groups for p in g.iterdir() if p.name in LIMIT_FILES}
            memory = found.get("memory.limit_in_bytes") or found.get("memory.max") or "0"
            assert (found.get("pids.max"), int(memory)) == wanted, found
        finally:
            node.cove.ok("rm", "-f", ident)
