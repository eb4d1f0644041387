"""`cove kbs serve --workers 2`: each worker on its own SO_REUSEPORT socket, one broker to clients.

Which worker answers a connection is read from the kernel (/proc/net/tcp and
each worker's descriptors), not from anything the broker says about itself.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from cove.kbs import evidence_appraisal, jose
from cove.kbs.client import AdminClient
from tests.conftest import COVE, error_line
from tests.kbs.conftest import MEASUREMENT, database, release_policy

SECRET = b"shared by both workers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tcp(port: int) -> list[tuple[int, int, str, int]]:
    """(local port, remote port, state, inode) of this host's IPv4 TCP sockets with local port ``port``."""
    rows = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)
        if local == port:
            rows.append((local, remote, fields[3], int(fields[9])))
    return rows


def _owner(inode: int, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the socket ``inode``."""
    wanted = f"socket:[{inode}]"
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                if os.readlink(f"/proc/{pid}/fd/{name}") == wanted:
                    return pid
            except OSError:
                pass
    return None


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _listeners(serve: subprocess.Popen, port: int) -> dict[int, int]:
    """inode -> worker pid of the sockets listening on ``port`` (state 0A)."""
    workers = _children(serve.pid)
    return {inode: _owner(inode, workers) for _, _, state, inode in _tcp(port) if state == "0A" and inode}


def _wait_for_listeners(serve: subprocess.Popen, port: int, log: Path, count: int = 2) -> dict[int, int]:
    deadline = time.monotonic() + 60
    while True:
        listening = _listeners(serve, port)
        if len(listening) == count and None not in listening.values():
            return listening
        assert serve.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"{len(listening)} listening sockets: {log.read_text()}"
        time.sleep(0.1)


class Connection:
    """One keep-alive HTTPS connection, and the worker process that accepted it."""

    def __init__(self, port: int, ca: ssl.SSLContext, serve: subprocess.Popen):
        self.http = http.client.HTTPSConnection("127.0.0.1", port, context=ca, timeout=30)
        self.status, _ = self.request("GET", "/kbs/v0/jwks")  # accepted (an fd in a worker) once answered
        client_port = self.http.sock.getsockname()[1]
        inodes = [inode for _, remote, state, inode in _tcp(port) if remote == client_port and state == "01"]
        self.worker = _owner(inodes[0], _children(serve.pid)) if inodes else None

    def request(
        self, method: str, path: str, body: dict | None = None, cookie: str | None = None
    ) -> tuple[int, dict | list | str]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if cookie:
            headers["Cookie"] = f"kbs-session-id={cookie}"
        self.http.request(method, path, body=json.dumps(body).encode() if body is not None else None, headers=headers)
        reply = self.http.getresponse()
        data = reply.read()
        self.cookie = (reply.getheader("set-cookie") or "").split(";", 1)[0].partition("=")[2] or None
        try:
            return reply.status, json.loads(data)
        except ValueError:
            return reply.status, data.decode("latin-1")


def _attestation(nonce: str, key) -> dict:
    runtime = {"nonce": nonce, "tee-pubkey": jose.public_jwk(key)}
    report_data = base64.b64encode(evidence_appraisal.expected_report_data(runtime)).decode()
    evidence = {"svn": 1, "debug": False, "measurement": MEASUREMENT, "report_data": report_data}
    return {"runtime-data": runtime, "tee-evidence": evidence}


@pytest.fixture(params=["sqlite", "postgresql"])
def two_workers(request, tmp_path):
    """`cove kbs serve --workers 2` (HTTPS) on a fresh broker, its port, state folder and environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVE_")}
    state = tmp_path / "state"
    env.update(HOME=str(tmp_path), COVE_KBS_STATE=str(state))
    db = database(request.param, request, tmp_path)
    done = subprocess.run([COVE, "kbs", "init", "--db", db], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    policy = tmp_path / "attestation.toml"
    policy.write_text('types = ["sample"]\n')
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen(
            [COVE, "kbs", "serve", "--db", db, "--listen", f"127.0.0.1:{port}", "--workers", "2", "--policy", policy],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield serve, port, state, env, log
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
            try:
                serve.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait()


def test_two_workers_each_listen_serve_flows_and_share_nonces(two_workers):
    serve, port, state, env, log = two_workers
    listening = _wait_for_listeners(serve, port, log)
    assert len(set(listening.values())) == 2, "each worker listens on a socket of its own"
    ca = ssl.create_default_context(cafile=str(state / "tls-ca.pem"))
    url = f"https://127.0.0.1:{port}"
    admin = AdminClient.from_file(url, state / "admin.json", state / "tls-ca.pem")
    admin.put_policy("p", release_policy())
    admin.create_secret("app/x/y", "data", "p", value=SECRET)
    # the kernel spreads connections over both sockets by their addresses
    by_worker: dict[int, Connection] = {}
    for _ in range(64):
        conn = Connection(port, ca, serve)
        assert conn.status == 200 and conn.worker in listening.values()
        by_worker.setdefault(conn.worker, conn)
        if len(by_worker) == 2:
            break
    assert len(by_worker) == 2, "64 connections all went to one worker"
    a, b = by_worker.values()

    for first, second in ((a, b), (b, a)):
        # a whole flow on one worker
        status, challenge = first.request("POST", "/kbs/v0/auth", {"version": "0.1.1", "tee": "sample"})
        assert status == 200, challenge
        cookie, key = first.cookie, jose.new_tee_key()
        body = _attestation(challenge["nonce"], key)
        status, token = first.request("POST", "/kbs/v0/attest", body, cookie)
        assert status == 200, token
        status, jwe = first.request("GET", "/kbs/v0/resource/app/x/y", cookie=cookie)
        assert status == 200 and jose.decrypt_from(jwe, key) == SECRET
        # the nonce it spent is refused by the other worker, and the refusal is audited
        status, problem = second.request("POST", "/kbs/v0/attest", body, cookie)
        assert status == 401 and problem["type"].endswith(":NonceReplayed"), problem

    # one flow across both: the challenge of one worker is answered at the other
    status, challenge = a.request("POST", "/kbs/v0/auth", {"version": "0.1.1", "tee": "sample"})
    cookie, key = a.cookie, jose.new_tee_key()
    body = _attestation(challenge["nonce"], key)
    assert b.request("POST", "/kbs/v0/attest", body, cookie)[0] == 200
    status, jwe = a.request("GET", "/kbs/v0/resource/app/x/y", cookie=cookie)
    assert status == 200 and jose.decrypt_from(jwe, key) == SECRET
    assert a.request("POST", "/kbs/v0/attest", body, cookie)[0] == 401

    refused = [r for r in admin.audit(limit=1000, action="attest") if r["outcome"] == "refused"]
    assert len([r for r in refused if "NonceReplayed" in (r.get("detail") or "")]) == 3, refused
    for conn in (a, b):  # each worker counted its own attestations
        status, metrics = conn.request("GET", "/metrics")
        assert 'cove_kbs_requests_total{outcome="attest"}' in metrics, metrics

    # a second broker on the port is refused, as it is without SO_REUSEPORT
    second = subprocess.run(
        [COVE, "kbs", "serve", "--listen", f"127.0.0.1:{port}", "--workers", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2 and "Address already in use" in error_line(second), second.stderr
    assert set(_listeners(serve, port).values()) == set(listening.values())

    # a worker that dies is replaced; meanwhile the other one takes every connection
    victim = a.worker
    os.kill(victim, signal.SIGKILL)
    gone = [inode for inode, pid in listening.items() if pid == victim]
    while any(state == "0A" and inode in gone for _, _, state, inode in _tcp(port)):
        time.sleep(0.01)  # until its socket is closed (a connection queued there before is lost with it)
    for _ in range(8):
        assert Connection(port, ca, serve).worker == b.worker
    replaced = _wait_for_listeners(serve, port, log)
    assert victim not in replaced.values() and b.worker in replaced.values()
    admin.close()

    # SIGHUP replaces the workers one at a time: the port always has a listener
    a.http.close()
    b.http.close()  # an old worker waits for its open TLS connections to close (uvicorn's graceful shutdown)
    before = set(replaced.values())
    os.kill(serve.pid, signal.SIGHUP)
    deadline = time.monotonic() + 90
    while True:
        assert any(state == "0A" for _, _, state, _ in _tcp(port)), "no worker listened during the replacement"
        now = _listeners(serve, port)
        if len(now) == 2 and None not in now.values() and not set(now.values()) & before:
            break
        assert time.monotonic() < deadline and serve.poll() is None, log.read_text()
        time.sleep(0.05)
    assert Connection(port, ca, serve).status == 200

    # the workers end with their supervisor, even one killed with SIGKILL
    os.kill(serve.pid, signal.SIGKILL)
    serve.wait()
    deadline = time.monotonic() + 30
    while any(state == "0A" for _, _, state, _ in _tcp(port)):
        assert time.monotonic() < deadline, "a worker outlived its supervisor"
        time.sleep(0.1)


def test_workers_refuse_a_bad_tls_key_with_one_line(tmp_path):
    """A key the workers could not load: one line and exit 2 from the supervisor, no worker's traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVE_")}
    state = tmp_path / "state"
    env.update(HOME=str(tmp_path), COVE_KBS_STATE=str(state))
    done = subprocess.run([COVE, "kbs", "init"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    bad = tmp_path / "bad.key"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    port = free_port()
    args = ["--listen", f"127.0.0.1:{port}", "--cert", state / "tls.crt", "--key", bad, "--workers", "2"]
    done = subprocess.run([COVE, "kbs", "serve", *map(str, args)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in error_line(done), done.stderr
    assert not any(state == "0A" for _, _, state, _ in _tcp(port))
