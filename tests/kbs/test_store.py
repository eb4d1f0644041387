"""Storage: encryption at rest, migrations, master-key checks, several brokers on one database."""

from __future__ import annotations

import os
import sqlite3
import threading

import pytest

from cove.kbs import store as store_mod
from cove.kbs.broker import Broker, Settings
from cove.kbs.client import KbsError
from cove.kbs.vault import Vault, VaultError, load_master_key, parse_key_text
from tests.kbs.conftest import MEASUREMENT, problem, release_policy, start_kbs, stop_kbs


def test_secrets_encrypted_at_rest(tmp_path, tls_files):
    db = tmp_path / "kbs.db"
    running = start_kbs(f"sqlite:///{db}", tmp_path, True, tls_files)
    try:
        running.secret("app/db/password", b"plaintext-canary-7731")
        running.admin.put_policy("p", release_policy())
        running.admin.create_secret("app/key/k", "ec-p256", "p", exportable=False)
    finally:
        stop_kbs(running)
    raw = b""
    for name in os.listdir(tmp_path):
        if name.startswith("kbs.db"):
            raw += (tmp_path / name).read_bytes()
    assert b"plaintext-canary-7731" not in raw
    assert b"PRIVATE KEY" not in raw
    assert oct(os.stat(db).st_mode & 0o777) == "0o600"


def test_sealed_record_cannot_move(tmp_path):
    vault = Vault(os.urandom(32))
    sealed = vault.seal("secret:a/b/c@1", b"value")
    assert vault.unseal("secret:a/b/c@1", sealed) == b"value"
    with pytest.raises(VaultError):
        vault.unseal("secret:a/b/c@2", sealed)  # another version
    with pytest.raises(VaultError):
        vault.unseal("secret:x/y/z@1", sealed)  # another secret
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(VaultError):
        vault.unseal("secret:a/b/c@1", bytes(tampered))


def test_wrong_master_key_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'kbs.db'}"
    Broker(Settings(db_url=url, master_key=os.urandom(32))).store.close()
    with pytest.raises(VaultError) as caught:
        Broker(Settings(db_url=url, master_key=os.urandom(32)))
    assert "does not match" in caught.value.message


def test_master_key_sources(tmp_path):
    key = os.urandom(32)
    (tmp_path / "hex").write_text(key.hex() + "\n")
    (tmp_path / "raw").write_bytes(key)
    assert load_master_key(tmp_path / "hex") == key
    assert load_master_key(tmp_path / "raw") == key
    import base64

    assert load_master_key(None, environ={"COVE_KBS_MASTER_KEY": base64.b64encode(key).decode()}) == key
    with pytest.raises(VaultError):
        load_master_key(None, environ={})
    with pytest.raises(VaultError):
        parse_key_text(b"too short", "x")
    with pytest.raises(VaultError):
        load_master_key(tmp_path / "missing")


def test_master_key_sealed_to_platform(tmp_path, monkeypatch):
    monkeypatch.setenv("COVE_PLATFORM_DIR", str(tmp_path / "platform"))
    from cove.kbs import vault

    key = os.urandom(32)
    try:
        vault.seal_to_platform(key, tmp_path / "master.sealed")
    except VaultError as exc:  # the platform layer must be present in this tree
        pytest.fail(exc.line())
    assert load_master_key(None, tmp_path / "master.sealed", environ={}) == key
    blob = bytearray((tmp_path / "master.sealed").read_bytes())
    blob[-1] ^= 1
    (tmp_path / "master.sealed").write_bytes(bytes(blob))
    with pytest.raises(VaultError):
        load_master_key(None, tmp_path / "master.sealed", environ={})


def test_migrations_idempotent_and_versioned(db_url):
    first = store_mod.Store(db_url)
    assert first.schema_version() == store_mod.SCHEMA_VERSION
    first.close()
    again = store_mod.Store(db_url)  # a second open applies nothing
    assert again.schema_version() == store_mod.SCHEMA_VERSION
    again.execute("UPDATE kbs_meta SET value = '999' WHERE key = 'schema_version'")
    again.close()
    with pytest.raises(store_mod.StoreError) as caught:
        store_mod.Store(db_url)
    assert "newer than this broker" in caught.value.message


def test_concurrent_first_start_on_one_database(db_url):
    """Several brokers starting together on an empty database: one schema, one broker id and key."""
    key = os.urandom(32)
    brokers, errors = [], []

    def start():
        try:
            brokers.append(Broker(Settings(db_url=db_url, master_key=key)))
        except Exception as exc:  # noqa: BLE001 - collected and asserted
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len({b.broker_id for b in brokers}) == 1
    assert len({b.tokens.kid for b in brokers}) == 1
    for b in brokers:
        b.store.close()


def test_two_servers_act_as_one(db_url, tmp_path, tls_files):
    """Sessions and nonces live in the database: auth on one, attest on the other, fetch from either."""
    key = os.urandom(32)
    a = start_kbs(db_url, tmp_path, True, tls_files, master_key=key)
    b = start_kbs(db_url, tmp_path, True, tls_files, master_key=key)
    try:
        a.secret("app/db/password", b"shared")
        client = a.client()
        nonce = client.challenge("sample")
        from cove.kbs import evidence_appraisal, jose

        tee = jose.new_tee_key()
        runtime = {"nonce": nonce, "tee-pubkey": jose.public_jwk(tee)}
        body = {
            "runtime-data": runtime,
            "tee-evidence": a.sample().evidence(evidence_appraisal.expected_report_data(runtime)),
        }
        cookie = client.http.cookies.get("kbs-session-id")
        other = b.client()
        other.http.cookies.set("kbs-session-id", cookie, domain="127.0.0.1", path="/kbs")
        reply = other.http.post("/kbs/v0/attest", json=body)
        assert reply.status_code == 200, reply.text
        token = reply.json()["token"]
        # the nonce is spent everywhere
        assert client.http.post("/kbs/v0/attest", json=body).status_code == 401
        other.tee_key = client.tee_key = tee
        client.token = token
        assert client.resource("app/db/password") == b"shared"  # cookie session made on b, used on a
        assert client.resource("app/db/password", bearer=True) == b"shared"  # b's token on a
        assert {r["action"] for r in b.broker.store.audit_log(limit=1000)} >= {"attest", "release"}
    finally:
        stop_kbs(a)
        stop_kbs(b)


def test_expired_sessions_are_purged(kbs):
    client = kbs.client()
    client.attest(kbs.sample())
    for _ in range(5):
        kbs.client().challenge("sample")
    assert kbs.broker.store.count_sessions() >= 6
    kbs.clock.advance(3600)
    kbs.broker._last_purge = -1e9  # the next auth purges
    kbs.client().challenge("sample")
    assert kbs.broker.store.count_sessions() == 1


def test_damaged_secret_row_does_not_leak(tmp_path, tls_files):
    db = tmp_path / "kbs.db"
    running = start_kbs(f"sqlite:///{db}", tmp_path, True, tls_files)
    try:
        running.secret("app/db/password", b"pw")
        with sqlite3.connect(db) as conn:
            sealed = conn.execute("SELECT sealed FROM secret_versions").fetchone()[0]
            conn.execute("UPDATE secret_versions SET sealed = ?", (sealed[:-1] + bytes([sealed[-1] ^ 1]),))
        client = running.client()
        client.attest(running.sample())
        with pytest.raises(KbsError) as caught:
            client.resource("app/db/password")
        assert problem(caught) == (503, "Unavailable")
        assert "failed authentication" in str(caught.value)
    finally:
        stop_kbs(running)


def test_concurrent_rotations_never_lose_a_version(kbs):
    kbs.secret("app/db/password", b"v1", measurement=MEASUREMENT)
    errors = []

    def rotate(n):
        for i in range(5):
            try:
                kbs.admin.rotate_secret("app/db/password", f"{n}-{i}".encode())
            except KbsError as exc:
                if exc.kind != "Conflict":
                    errors.append(exc)

    threads = [threading.Thread(target=rotate, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    described = kbs.admin.secret("app/db/password")
    versions = [v["version"] for v in described["versions"]]
    assert versions == list(range(1, described["version"] + 1))


def test_sqlite_writers_take_turns_across_processes(tmp_path):
    """Writers of every process on one SQLite database queue on the lock file beside it (`--workers N`
    would otherwise meet in SQLite's busy handler, which sleeps between tries): while another process
    holds the turn, a write waits, and it completes once the turn is released. Readers never wait."""
    import fcntl
    import subprocess
    import sys

    db = tmp_path / "kbs.db"
    store = store_mod.Store(f"sqlite:///{db}")
    lock = tmp_path / "kbs.db-writer"
    assert oct(os.stat(lock).st_mode & 0o777) == "0o600"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys; f = open(sys.argv[1], 'r+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('held', flush=True); sys.stdin.readline()",
            str(lock),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        order: list[str] = []
        writer = threading.Thread(target=lambda: (store.audit("test", "write", "ok"), order.append("written")))
        writer.start()
        assert store.audit_log(0, 10, "write") == []  # a reader does not wait for the turn
        writer.join(timeout=1.0)
        assert writer.is_alive() and not order, "a write went ahead while another process held the turn"
        order.append("released")
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=10)
        writer.join(timeout=30)
        assert order == ["released", "written"]
        assert [r["action"] for r in store.audit_log(0, 10, "write")] == ["write"]
        with open(lock, "r+") as f:  # the turn is free again
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        holder.kill()
        holder.wait()
        store.close()
