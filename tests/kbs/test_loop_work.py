"""Protocol work on the event loop (SQLite): a write that would wait for another writer fails within
2 ms, before it has any effect, and the request runs again in the thread pool; the loop never waits
longer, and it takes no turn on the writers' lock file (held by threads while they wait for the
interpreter lock)."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time

import httpx
import pytest

from cove.kbs import evidence_appraisal, jose
from cove.kbs.store import Busy, Store, StoreError
from tests.kbs.conftest import MEASUREMENT, ssl_for


class ForeignWriter:
    """Another writer on the database: SQLite's own lock (any process) or the brokers' lock file."""

    def __init__(self, db, how: str):
        self.db, self.how = db, how

    def __enter__(self) -> ForeignWriter:
        if self.how == "sqlite":
            self.conn = sqlite3.connect(self.db, isolation_level=None, timeout=1)
            self.conn.execute("BEGIN IMMEDIATE")
        else:
            self.fd = os.open(f"{self.db}-writer", os.O_RDWR)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.how == "sqlite":
            self.conn.execute("COMMIT")
            self.conn.close()
        else:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def test_store_refuses_to_wait_and_writes_nothing(tmp_path):
    db = tmp_path / "kbs.db"
    store = Store(f"sqlite:///{db}")
    try:
        store.create_session("s1", "n1", "sample", 300, time.time())
        with ForeignWriter(db, "sqlite"), store.without_waiting():
            started = time.monotonic()
            for write in (
                lambda: store.create_session("s2", "n2", "sample", 300, time.time()),
                lambda: store.claim_challenge("s1", "n1", time.time()),
                lambda: store.finish_session("s1", True, {}, {}, 300, time.time(), audit=("a", "attest", "ok")),
                lambda: store.audit("a", "release", "ok"),
            ):
                with pytest.raises(Busy):
                    write()
            assert time.monotonic() - started < 1  # SQLite's busy timeout is 30 s elsewhere
            assert store.session("s1").state == "challenged"  # reads do not wait
        assert store.session("s2") is None and store.session("s1").state == "challenged"
        assert store.audit_log() == []
        with store.without_waiting():  # free again: the same thread's writes go through
            assert store.claim_challenge("s1", "n1", time.time()) == "sample"
    finally:
        store.close()


def test_the_loop_takes_no_turn_on_the_lock_file(tmp_path):
    """Threads hold their turn while they wait for the interpreter lock, which the loop holds."""
    db = tmp_path / "kbs.db"
    store = Store(f"sqlite:///{db}")
    try:
        with ForeignWriter(db, "lock-file"):
            with store.without_waiting():
                store.create_session("s1", "n1", "sample", 300, time.time())
                assert store.claim_challenge("s1", "n1", time.time()) == "sample"
            waiting = threading.Thread(target=lambda: store.create_session("s2", "n", "sample", 300, time.time()))
            waiting.start()
            waiting.join(0.5)
            assert waiting.is_alive()  # a thread's write still takes its turn
        waiting.join(10)
        assert store.session("s2") is not None
    finally:
        store.close()


def test_only_sqlite_refuses_to_wait(pg):
    store = Store(pg.create_database("kbs_nowait"))
    try:
        with pytest.raises(StoreError, match="only a SQLite store"), store.without_waiting():
            pass
    finally:
        store.close()


def test_a_busy_refusal_is_written_when_it_comes_again(tmp_path):
    """Regression: a refusal whose audit write failed was then only counted, its first entry lost."""
    db = tmp_path / "kbs.db"
    store = Store(f"sqlite:///{db}")
    try:
        with ForeignWriter(db, "sqlite"), store.without_waiting(), pytest.raises(Busy):
            store.audit_refusal("session:x", "attest", None, "NonceMismatch: no")
        store.audit_refusal("session:x", "attest", None, "NonceMismatch: no")
        assert [(e["actor"], e["outcome"], e["detail"]) for e in store.audit_log()] == [
            ("session:x", "refused", "NonceMismatch: no")
        ]
    finally:
        store.close()


def test_appraisal_half_runs_again_without_spending_the_nonce_twice(make_kbs, tmp_path):
    db = tmp_path / "halves.db"
    kbs = make_kbs(db=f"sqlite:///{db}")
    broker = kbs.broker
    session, challenge = broker.auth({"version": "0.1.1", "tee": "sample"})
    runtime = {"nonce": challenge["nonce"], "tee-pubkey": jose.public_jwk(jose.new_tee_key())}
    evidence = kbs.sample().evidence(evidence_appraisal.expected_report_data(runtime))
    claimed = broker.begin_attest(session, {"runtime-data": runtime, "tee-evidence": evidence})
    assert claimed.quick
    with ForeignWriter(db, "sqlite"), broker.store.without_waiting(), pytest.raises(Busy):
        broker.finish_attest(claimed)
    assert broker.store.session(session).state == "appraising"
    assert broker.finish_attest(claimed).count(".") == 2  # in the pool, where it may wait
    assert broker.store.session(session).state == "attested"
    assert [e["outcome"] for e in broker.store.audit_log(action="attest")] == ["ok"]


def _handoffs(http: httpx.Client) -> int:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("cove_kbs_busy_handoffs_total "):
            return int(line.split()[1])
    raise AssertionError("no cove_kbs_busy_handoffs_total in /metrics")


def test_busy_requests_go_to_the_pool_while_the_loop_serves_others(make_kbs, tmp_path):
    db = tmp_path / "busy.db"
    kbs = make_kbs(db=f"sqlite:///{db}")
    kbs.secret("app/db/password", b"hunter2", MEASUREMENT)
    client = kbs.client()

    def attest() -> int:  # the attestation of the session steps[0] opened, without a new auth
        client.tee_key = jose.new_tee_key()
        runtime = {"nonce": nonce[0], "tee-pubkey": jose.public_jwk(client.tee_key)}
        evidence = kbs.sample().evidence(evidence_appraisal.expected_report_data(runtime))
        return client.http.post("/kbs/v0/attest", json={"runtime-data": runtime, "tee-evidence": evidence}).status_code

    nonce: list[str] = []
    steps = [
        ("auth", lambda: nonce.append(client.challenge("sample"))),
        ("attest", attest),
        ("resource", lambda: client.resource("app/db/password")),
    ]
    done: dict = {}
    with httpx.Client(base_url=kbs.url, verify=ssl_for(kbs), timeout=10) as http:
        for name, step in steps:
            before = _handoffs(http)
            worker = threading.Thread(target=lambda name=name, step=step: done.setdefault(name, step()))
            with ForeignWriter(db, "sqlite"):
                worker.start()
                time.sleep(0.5)
                started = time.monotonic()
                assert http.get("/kbs/v0/jwks").status_code == 200  # the loop is free
                assert time.monotonic() - started < 2
                assert worker.is_alive() and name not in done, name  # waiting in the pool
            worker.join(30)
            assert name in done, name
            assert _handoffs(http) == before + 1, name
    assert done["attest"] == 200 and done["resource"] == b"hunter2"
    outcomes = [(e["action"], e["outcome"]) for e in kbs.broker.store.audit_log() if e["action"] != "secret.create"]
    assert outcomes.count(("attest", "ok")) == 1 and outcomes.count(("release", "ok")) == 1


def test_memory_is_trimmed_after_a_burst_not_during_it(make_kbs, monkeypatch):
    """Regression: requests answered on the loop leave none in flight between them, and the
    trimmer, which waited for none in flight, trimmed in the middle of a burst and not after it
    (the review's /auth flood then ratcheted resident memory past 250 MB)."""
    from cove.kbs import server as server_mod

    trims: list[float] = []
    monkeypatch.setattr(server_mod, "TRIM_INTERVAL", 0.2)
    monkeypatch.setattr(server_mod, "TRIM_AFTER", 20)
    monkeypatch.setattr(server_mod, "release_free_memory", lambda: trims.append(time.monotonic()))
    kbs = make_kbs()
    with httpx.Client(base_url=kbs.url, verify=ssl_for(kbs), timeout=10) as http:
        started = time.monotonic()
        while time.monotonic() - started < 1.5:  # requests one after another: none in flight between them
            assert http.post("/kbs/v0/auth", json={"version": "0.1.1", "tee": "sample"}).status_code == 200
        ended = time.monotonic()
    time.sleep(1.0)
    assert trims and all(t > ended for t in trims), (trims, started, ended)


def _rows_in_main_file(db) -> int:
    """Sessions in the database file itself, without its write-ahead log (what checkpoints copied)."""
    conn = sqlite3.connect(f"file:{db}?immutable=1", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])
    except sqlite3.OperationalError:  # the schema itself is still only in the log
        return 0
    finally:
        conn.close()


def test_checkpoints_run_in_a_thread_not_in_the_loops_commits(make_kbs, tmp_path, monkeypatch):
    """The loop's connection leaves the write-ahead log to a checkpoint in the pool (each is an
    fdatasync of milliseconds, which on the loop stalled every connection)."""
    from cove.kbs import server as server_mod

    monkeypatch.setattr(server_mod, "CHECKPOINT_INTERVAL", 0.1)
    db = tmp_path / "wal.db"
    kbs = make_kbs(db=f"sqlite:///{db}")
    with httpx.Client(base_url=kbs.url, verify=ssl_for(kbs), timeout=10) as http:
        for _ in range(40):
            assert http.post("/kbs/v0/auth", json={"version": "0.1.1", "tee": "sample"}).status_code == 200
        deadline = time.monotonic() + 5
        while _rows_in_main_file(db) < 40 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert _rows_in_main_file(db) == kbs.broker.store.count_sessions() == 40
