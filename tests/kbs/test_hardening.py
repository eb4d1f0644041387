"""`cove kbs serve` under abuse: capped bodies, admins authenticated before their body is read,
one code path per endpoint, no blocking on the event loop, every refusal audited, admin tokens
used once (across brokers sharing a database)."""

from __future__ import annotations

import base64
import json
import select
import socket
import sqlite3
import ssl
import threading
import time
from pathlib import Path

import httpx
import pytest
from joserfc import jwk

from cove.kbs import evidence_appraisal, jose
from cove.kbs.problems import TYPE_PREFIX
from cove.kbs import server as server_mod
from cove.kbs.server import BODY_LIMITS
from tests.kbs.conftest import ssl_for

BIG = 50 << 20  # what the attack sent: 50 MB bodies


def _connect(kbs) -> ssl.SSLSocket:
    host, port = kbs.url.split("//", 1)[1].rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=10)
    return ssl_for(kbs).wrap_socket(raw, server_hostname=host)


def _head(method: str, path: str, *headers: str) -> bytes:
    return ("\r\n".join([f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers]) + "\r\n\r\n").encode()


def _response(conn: ssl.SSLSocket, timeout: float = 10, data: bytes = b"") -> tuple[int, dict, bool]:
    """(status, problem document, whether the server closed the connection after answering)."""
    conn.settimeout(timeout)
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"the server closed without answering: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(rest) < length:
        chunk = conn.recv(65536)
        assert chunk
        rest += chunk
    try:
        closed = conn.recv(1) == b""
    except (ConnectionError, ssl.SSLError):
        closed = True
    return int(lines[0].split()[1]), json.loads(rest[:length]) if length else {}, closed


def _admin_token(kbs) -> str:
    return jose.make_admin_token(kbs.admin.key, "root", kbs.broker.audience)


@pytest.mark.parametrize(
    "method,path,auth",
    [
        ("POST", "/kbs/v0/auth", False),
        ("POST", "/kbs/v0/attest", False),
        ("PUT", "/kbs/v0/admin/policies/p", True),
        ("POST", "/kbs/v0/admin/secrets", True),
    ],
)
def test_declared_oversized_body_refused_unread(make_kbs, method, path, auth):
    """A 50 MB Content-Length is answered 413 at once, with none of the body sent, and the connection closed."""
    kbs = make_kbs()
    headers = [f"Content-Length: {BIG}", "Content-Type: application/json"]
    if auth:
        headers.append(f"Authorization: Bearer {_admin_token(kbs)}")
    with _connect(kbs) as conn:
        conn.sendall(_head(method, path, *headers))
        status, document, closed = _response(conn)
    assert status == 413 and document["type"] == TYPE_PREFIX + "PayloadTooLarge", document
    assert closed
    refused = [r for r in kbs.admin.audit(action="request") if r["outcome"] == "refused"]
    assert refused and refused[-1]["resource"] == path and "PayloadTooLarge" in refused[-1]["detail"], refused


def test_unauthenticated_admin_body_never_read(make_kbs):
    """Admin requests are authenticated from their headers: 401 before a byte of the 50 MB body."""
    kbs = make_kbs()
    forged = jose.make_admin_token(jwk.generate_key("EC", "P-256"), "root", kbs.broker.audience)
    for extra in ([], [f"Authorization: Bearer {forged}"]):
        with _connect(kbs) as conn:
            conn.sendall(
                _head(
                    "POST", "/kbs/v0/admin/secrets", f"Content-Length: {BIG}", "Content-Type: application/json", *extra
                )
            )
            status, document, closed = _response(conn)
        assert status == 401 and document["type"] == TYPE_PREFIX + "AdminAuth", document
        assert closed


def test_chunked_body_cut_off_while_read(make_kbs):
    """Without a Content-Length the cap holds while reading: 413 once past the cap, and the 64 MiB the
    client goes on sending are never held (the broker runs in this process: its peak RSS is measured)."""
    kbs = make_kbs()
    limit = BODY_LIMITS[("POST", "/kbs/v0/attest")]
    chunk = b"%x\r\n%s\r\n" % (64 << 10, b" " * (64 << 10))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _peak_rss()
    with _connect(kbs) as conn:
        conn.sendall(_head("POST", "/kbs/v0/attest", "Transfer-Encoding: chunked", "Content-Type: application/json"))
        sent, early = _send_until_answered(conn, chunk, 64 << 20)
        status, document, closed = _response(conn, data=early)
    assert status == 413 and document["type"] == TYPE_PREFIX + "PayloadTooLarge", document
    assert closed
    assert sent < 64 << 20, "the server never answered while the body was being sent"
    assert _peak_rss() - before < limit + (24 << 20), (before, _peak_rss(), sent)


def _send_until_answered(conn: ssl.SSLSocket, chunk: bytes, most: int) -> tuple[int, bytes]:
    """Send chunks until the server's answer begins (or it cuts the connection): bytes sent, and the
    start of the answer.

    One thread only: an SSL socket must not be read and written from two threads at once
    (OpenSSL aborts the process)."""
    sent, early = 0, b""
    deadline = time.monotonic() + 30
    while sent < most and time.monotonic() < deadline:
        if conn.pending() or select.select([conn], [], [], 0)[0]:
            conn.setblocking(False)  # readable may be only a TLS session ticket: look without waiting
            try:
                early = conn.recv(65536)
            except ssl.SSLWantReadError:
                pass
            except (OSError, ValueError):
                break
            finally:
                conn.setblocking(True)
            if early:
                break
        try:
            conn.sendall(chunk)
        except (OSError, ValueError):  # the server cut the connection
            break
        sent += len(chunk)
    return sent, early


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM in /proc/self/status")


def test_stalled_body_cut_off(make_kbs, monkeypatch):
    """A client that stops in the middle of its body is answered 408 and disconnected."""
    monkeypatch.setattr(server_mod, "BODY_TIMEOUT", 1.0)
    kbs = make_kbs()
    with _connect(kbs) as conn:
        conn.sendall(
            _head("POST", "/kbs/v0/auth", "Content-Length: 100", "Content-Type: application/json") + b'{"version": '
        )
        started = time.monotonic()
        status, document, closed = _response(conn)
    assert status == 408 and "did not arrive" in document["detail"], document
    assert closed and time.monotonic() - started < 8


def test_one_code_path_whatever_the_content_type(make_kbs):
    """/auth answers the same with or without a JSON Content-Type (there is no second path)."""
    kbs = make_kbs()
    body = json.dumps({"version": "0.1.1", "tee": "sample", "extra-params": {}})
    with httpx.Client(base_url=kbs.url, verify=ssl_for(kbs)) as http:
        for content_type in ("application/json", "text/plain", "application/octet-stream"):
            reply = http.post("/kbs/v0/auth", content=body, headers={"Content-Type": content_type})
            assert reply.status_code == 200 and reply.json()["nonce"], (content_type, reply.text)
        reply = http.post("/kbs/v0/auth", content=b"{not json", headers={"Content-Type": "text/plain"})
        assert reply.json()["type"] == TYPE_PREFIX + "InvalidRequest"
        for version in ("abc", "0", "²", "1" * 40, str((1 << 30) + 1)):
            reply = http.get("/kbs/v0/resource/a/b/c", params={"version": version})
            assert reply.json()["type"] == TYPE_PREFIX + "InvalidRequest", (version, reply.text)
        reply = http.put("/kbs/v0/auth", json={})
        assert reply.status_code == 405 and reply.json()["status"] == 405
        schema = http.get("/openapi.json").json()
        assert {"AuthRequest", "Attestation", "RuntimeData"} <= set(schema["components"]["schemas"])
        assert "requestBody" in schema["paths"]["/kbs/v0/attest"]["post"]


def test_database_wait_does_not_block_other_requests(make_kbs, tmp_path):
    """A request stuck on a locked database leaves the event loop free for the others."""
    db = tmp_path / "locked.db"
    kbs = make_kbs(db=f"sqlite:///{db}")
    locker = sqlite3.connect(db, isolation_level=None, timeout=1)
    locker.execute("BEGIN IMMEDIATE")
    result: dict = {}

    def stuck_auth():
        with httpx.Client(base_url=kbs.url, verify=ssl_for(kbs), timeout=60) as http:
            result["auth"] = http.post("/kbs/v0/auth", json={"version": "0.1.1", "tee": "sample"}).status_code

    thread = threading.Thread(target=stuck_auth)
    try:
        thread.start()
        time.sleep(0.5)  # the /auth is now waiting for the write lock
        with httpx.Client(base_url=kbs.url, verify=ssl_for(kbs), timeout=5) as http:
            started = time.monotonic()
            assert http.get("/kbs/v0/jwks").status_code == 200
            assert time.monotonic() - started < 5
        assert thread.is_alive() and "auth" not in result  # it really was waiting
    finally:
        locker.execute("COMMIT")
        locker.close()
        thread.join(60)
    assert result["auth"] == 200


def test_active_requests_bounded(make_kbs, tmp_path, monkeypatch):
    """Past the guard's bound, requests wait (bodies unread) instead of piling up in the broker."""
    monkeypatch.setattr(server_mod, "MAX_ACTIVE", 2)
    db = tmp_path / "bounded.db"
    kbs = make_kbs(db=f"sqlite:///{db}")
    locker = sqlite3.connect(db, isolation_level=None, timeout=1)
    locker.execute("BEGIN IMMEDIATE")  # every /auth now waits for the database
    statuses: list = []

    def one_auth():
        with httpx.Client(base_url=kbs.url, verify=ssl_for(kbs), timeout=60) as http:
            statuses.append(http.post("/kbs/v0/auth", json={"version": "0.1.1", "tee": "sample"}).status_code)

    threads = [threading.Thread(target=one_auth) for _ in range(6)]
    try:
        for thread in threads:
            thread.start()
        gauges: dict = {}
        with httpx.Client(base_url=kbs.url, verify=ssl_for(kbs), timeout=10) as http:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                lines = http.get("/metrics").text.splitlines()
                gauges = {
                    k: int(v)
                    for k, _, v in (
                        line.partition(" ")
                        for line in lines
                        if line.startswith(("cove_kbs_active", "cove_kbs_waiting"))
                    )
                }
                if gauges.get("cove_kbs_waiting_requests") == 4:
                    break
                time.sleep(0.1)
        assert gauges == {"cove_kbs_active_requests": 2, "cove_kbs_waiting_requests": 4}, gauges
    finally:
        locker.execute("COMMIT")
        locker.close()
        for thread in threads:
            thread.join(60)
    assert statuses == [200] * 6


def _refusals(kbs, action: str) -> list[dict]:
    return [r for r in kbs.admin.audit(limit=1000, action=action) if r["outcome"] == "refused"]


def test_admin_auth_refusals_audited(kbs):
    """No token, a forged signature, alg=none, expired, another broker's, a replayed token: each audited."""
    forged = jose.make_admin_token(jwk.generate_key("EC", "P-256"), "root", kbs.broker.audience)
    now = int(time.time())
    unsigned = ".".join(
        base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")
        for part in (
            {"alg": "none", "kid": "root"},
            {"aud": kbs.broker.audience, "iat": now, "exp": now + 60, "jti": "a" * 16},
        )
    )
    expired = jose.make_admin_token(kbs.admin.key, "root", kbs.broker.audience, now=time.time() - 3600)
    foreign = jose.make_admin_token(kbs.admin.key, "root", "cove-kbs:another")
    once = _admin_token(kbs)
    cases = {
        "no admin key": None,
        "signature": forged,
        "signature is not valid": unsigned + ".",
        "expired": expired,
        "another broker": foreign,
        "already used": once,
    }
    with httpx.Client(base_url=kbs.url, verify=ssl_for(kbs)) as http:
        assert http.get("/kbs/v0/admin/secrets", headers={"Authorization": f"Bearer {once}"}).status_code == 200
        for words, token in cases.items():
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            reply = http.get("/kbs/v0/admin/secrets", headers=headers)
            assert reply.status_code == 401 and words in reply.json()["detail"], (words, reply.text)
    details = [r["detail"] for r in _refusals(kbs, "admin.auth")]
    for words in cases:
        assert any(words in d for d in details), (words, details)
    assert sum("signature is not valid" in d for d in details) == 2  # forged and alg=none, each recorded


def test_resource_and_nonce_refusals_audited(kbs):
    kbs.secret("app/db/password")
    client = kbs.client()
    for bearer, cookie in ((None, None), ("not.a.token", None), (None, "forged-session")):
        client.http.cookies.clear()
        if cookie:
            client.http.cookies.set("kbs-session-id", cookie, domain="127.0.0.1", path="/kbs")
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        assert client.http.get("/kbs/v0/resource/app/db/password", headers=headers).status_code == 401
    client.challenge("sample")  # a session that has not attested
    assert client.http.get("/kbs/v0/resource/app/db/password").status_code == 401
    key = jose.new_tee_key()
    runtime = {"nonce": client.challenge("sample"), "tee-pubkey": jose.public_jwk(key)}
    body = {
        "runtime-data": runtime,
        "tee-evidence": kbs.sample().evidence(evidence_appraisal.expected_report_data(runtime)),
    }
    assert client.http.post("/kbs/v0/attest", json=body).status_code == 200
    assert client.http.post("/kbs/v0/attest", json=body).json()["type"] == TYPE_PREFIX + "NonceReplayed"
    client.challenge("sample")
    assert client.http.post("/kbs/v0/attest", json=body).json()["type"] == TYPE_PREFIX + "NonceMismatch"
    client.http.cookies.clear()
    assert client.http.post("/kbs/v0/attest", json=body).json()["type"] == TYPE_PREFIX + "SessionNotFound"
    released = " | ".join(r["detail"] for r in _refusals(kbs, "release"))
    for kind in ("TokenNotFound", "TokenVerifierError", "SessionNotFound", "AttestationError"):
        assert kind in released, (kind, released)
    attested = " | ".join(r["detail"] for r in _refusals(kbs, "attest"))
    for kind in ("NonceReplayed", "NonceMismatch", "SessionNotFound"):
        assert kind in attested, (kind, attested)


def test_refusal_flood_aggregated_and_counted(kbs):
    """30 identical refusals: one entry at once, and the other 29 counted."""
    with httpx.Client(base_url=kbs.url, verify=ssl_for(kbs)) as http:
        for _ in range(30):
            assert http.get("/kbs/v0/admin/secrets").status_code == 401
    kbs.broker.store.flush_refusals()
    rows = [r for r in _refusals(kbs, "admin.auth") if "no admin key" in r["detail"]]
    total = 0
    for row in rows:
        repeated = row["detail"].rsplit("(repeated ", 1)
        total += int(repeated[1].split()[0]) if len(repeated) == 2 else 1
    assert total == 30 and len(rows) <= 3, rows


def test_admin_token_replay_refused_across_brokers(kbs, make_kbs, db_url):
    """A token is accepted once, by any broker on the database (SQLite file or PostgreSQL)."""
    other = make_kbs(db=db_url, master_key=kbs.broker.settings.master_key)
    assert other.broker.audience == kbs.broker.audience
    token = _admin_token(kbs)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=kbs.url, verify=ssl_for(kbs)) as http:
        assert http.get("/kbs/v0/admin/secrets", headers=headers).status_code == 200
        again = http.get("/kbs/v0/admin/secrets", headers=headers)
        assert again.status_code == 401 and "already used" in again.json()["detail"]
    with httpx.Client(base_url=other.url, verify=ssl_for(other)) as http:
        elsewhere = http.get("/kbs/v0/admin/secrets", headers=headers)
        assert elsewhere.status_code == 401 and "already used" in elsewhere.json()["detail"]
        fresh = http.get("/kbs/v0/admin/secrets", headers={"Authorization": f"Bearer {_admin_token(kbs)}"})
        assert fresh.status_code == 200


def test_used_token_ids_purged_after_expiry(make_kbs):
    kbs = make_kbs()
    store, now = kbs.broker.store, time.time()
    assert store.use_token_id("root:old", now + 30, now)
    assert not store.use_token_id("root:old", now + 30, now)
    assert store.use_token_id("root:new", now + 600, now + 120)  # a minute on: expired ids are purged
    assert store.query("SELECT id FROM used_tokens ORDER BY id") == [("root:new",)]
