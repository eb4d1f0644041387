"""Storage: SQLite by default, PostgreSQL with ``postgresql://...``.

Everything the broker knows lives here, never in a process: secrets (sealed
by :mod:`cove.kbs.vault`), policies, admin keys, attestation sessions with
their nonces, the audit log, and the broker's own keys (sealed). Two broker
processes on one PostgreSQL database therefore act as one service.

The schema is versioned: :data:`MIGRATIONS` is an append-only list, and
opening a store applies the steps it has not seen, each in a transaction,
under a lock so that two processes starting together do not race.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from collections.abc import Callable, Iterator, Sequence

from cove.errors import CoveError

# Each step: (version, description, [statements]); {blob}, {real}, {serial} are
# replaced per dialect. Never edit a released step: append a new one.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "initial schema",
        [
            "CREATE TABLE kbs_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "CREATE TABLE kbs_keys (name TEXT PRIMARY KEY, sealed {blob} NOT NULL, created_at {real} NOT NULL)",
            "CREATE TABLE policies (name TEXT PRIMARY KEY, body TEXT NOT NULL, version INTEGER NOT NULL,"
            " created_at {real} NOT NULL, updated_at {real} NOT NULL)",
            "CREATE TABLE secrets (path TEXT PRIMARY KEY, kind TEXT NOT NULL, params TEXT NOT NULL,"
            " policy TEXT NOT NULL, exportable INTEGER NOT NULL, current_version INTEGER NOT NULL,"
            " public TEXT, created_at {real} NOT NULL, updated_at {real} NOT NULL)",
            "CREATE TABLE secret_versions (path TEXT NOT NULL, version INTEGER NOT NULL, sealed {blob} NOT NULL,"
            " created_at {real} NOT NULL, created_by TEXT NOT NULL, PRIMARY KEY (path, version))",
            "CREATE TABLE admin_keys (name TEXT PRIMARY KEY, jwk TEXT NOT NULL, role TEXT NOT NULL,"
            " created_at {real} NOT NULL)",
            "CREATE TABLE sessions (id TEXT PRIMARY KEY, nonce TEXT NOT NULL, tee TEXT NOT NULL,"
            " state TEXT NOT NULL, created_at {real} NOT NULL, expires_at {real} NOT NULL,"
            " claims TEXT, tee_pubkey TEXT)",
            "CREATE INDEX sessions_expiry ON sessions (expires_at)",
            "CREATE TABLE audit (id {serial}, at {real} NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,"
            " resource TEXT, measurement TEXT, outcome TEXT NOT NULL, detail TEXT)",
            "CREATE INDEX audit_at ON audit (at)",
        ],
    ),
    (
        2,
        "used admin token ids (replay protection)",
        [
            "CREATE TABLE used_tokens (id TEXT PRIMARY KEY, expires_at {real} NOT NULL)",
            "CREATE INDEX used_tokens_expiry ON used_tokens (expires_at)",
        ],
    ),
]
# Identical refusals within this many seconds are one audit entry and a count (see Store.audit_refusal).
REFUSAL_WINDOW = 10.0
SCHEMA_VERSION = MIGRATIONS[-1][0]

_DIALECT = {
    "sqlite": {"{blob}": "BLOB", "{real}": "REAL", "{serial}": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    "postgresql": {"{blob}": "BYTEA", "{real}": "DOUBLE PRECISION", "{serial}": "BIGSERIAL PRIMARY KEY"},
}
T = TypeVar("T")
# How long a thread that must not wait (Store.without_waiting) lets SQLite retry a locked database
# before it answers Busy: two of SQLite's shortest sleeps, long enough for another worker's statement.
NOWAIT_BUSY_MS = 2
# The loop's own connection leaves checkpoints (an fdatasync each) to Store.checkpoint in a thread;
# this many pages of write-ahead log are its safety net should none run.
NOWAIT_AUTOCHECKPOINT = 10000
# A PostgreSQL advisory lock key for migrations ("cove-kbs" as an integer).
_PG_LOCK = 0x636F76656B6273


class StoreError(CoveError):
    """The database cannot be opened or used."""


class Busy(StoreError):
    """Another writer holds the database, and this thread asked not to wait (Store.without_waiting).

    Raised before the statement had any effect: the caller may run its work again where waiting is
    allowed."""

    def __init__(self) -> None:
        super().__init__("the database is busy with another writer")


class _NoWait(threading.local):
    """Per thread: whether statements must not wait for a lock, and that thread's own connection."""

    active = False
    conn: Any = None


@dataclass(frozen=True)
class SessionRow:
    id: str
    nonce: str
    tee: str
    state: str
    created_at: float
    expires_at: float
    claims: dict[str, Any] | None
    tee_pubkey: dict[str, Any] | None


@dataclass(frozen=True)
class SecretRow:
    path: str
    kind: str
    params: dict[str, Any]
    policy: str
    exportable: bool
    current_version: int
    public: dict[str, Any] | None
    created_at: float
    updated_at: float


# What a release reads: the secret, its policy (body, version) and the sealed value, the last two if they exist.
ReleaseRow = tuple[SecretRow, tuple[str, int] | None, bytes | None]


def _fill(statement: str, dialect: str) -> str:
    for key, value in _DIALECT[dialect].items():
        statement = statement.replace(key, value)
    return statement


class _Pool:
    """A small blocking pool of connections (one per concurrent request thread).

    Taking and returning a connection is a list pop and append (atomic under
    the GIL): every database statement goes through here, so the fast path
    takes no lock; a condition is used only when the pool is empty.
    """

    def __init__(self, connect: Callable[[], Any], size: int):
        self._connect = connect
        self._size = size
        self._idle: list[Any] = []
        self._open = 0
        self._waiting = 0
        self._cond = threading.Condition()

    def get(self) -> Any:
        try:
            return self._idle.pop()
        except IndexError:
            return self._wait_or_connect()

    def _wait_or_connect(self) -> Any:
        deadline = time.monotonic() + 30
        with self._cond:
            self._waiting += 1
            try:
                while True:
                    try:
                        return self._idle.pop()
                    except IndexError:
                        pass
                    if self._open < self._size:
                        self._open += 1
                        break
                    if not self._cond.wait(max(0.0, deadline - time.monotonic())) and not self._idle:
                        raise StoreError("the database connection pool is exhausted")
            finally:
                self._waiting -= 1
        try:
            return self._connect()
        except BaseException:
            self._forget()
            raise

    def put(self, conn: Any) -> None:
        self._idle.append(conn)
        if self._waiting:
            with self._cond:
                self._cond.notify()

    def discard(self, conn: Any) -> None:
        """Drop a connection a statement failed on (it may be broken)."""
        try:
            conn.close()
        except Exception:
            pass
        self._forget()

    def _forget(self) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify()

    @contextmanager
    def connection(self) -> Iterator[Any]:
        conn = self.get()
        try:
            yield conn
        except BaseException:
            self.discard(conn)
            raise
        self.put(conn)

    def close(self) -> None:
        while True:
            try:
                conn = self._idle.pop()
            except IndexError:
                return
            self.discard(conn)


class Store:
    """The broker's database; safe to share between the threads of a process."""

    def __init__(self, url: str, pool_size: int = 16):
        self.url = url
        if url.startswith(("postgresql://", "postgres://")):
            self.dialect = "postgresql"
            self._pool = _Pool(self._connect_pg, pool_size)
        else:
            self.dialect = "sqlite"
            path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else url
            if path.startswith("sqlite:"):
                raise StoreError(f"--db {url}: write sqlite:///PATH or a plain file path")
            self.path = Path(path)
            if not self.path.parent.is_dir():
                raise StoreError(f"--db {url}: folder {self.path.parent} does not exist")
            self._pool = _Pool(self._connect_sqlite, pool_size)
        # SQLite takes one writer at a time and makes the others sleep in its busy handler (1, 2, 5 ms
        # ...): writers in threads take turns on a lock file beside the database instead
        # (_SqliteConnection), which wakes the next at once, in this process and in every other one on
        # the same database (`--workers N`). Readers take no turn (WAL), nor does an event loop's own
        # connection (without_waiting), whose statements hold SQLite's lock for tens of microseconds.
        if self.dialect == "sqlite":
            self.writer_lock = self.path.with_name(self.path.name + "-writer")
            os.close(self._open_writer_lock())  # made now (0600): a folder it cannot be made in fails here
        self._refusals: dict[tuple[Any, ...], tuple[float, int]] = {}
        self._refusal_lock = threading.Lock()
        self._nowait = _NoWait()
        self._nowait_conns: list[_SqliteConnection] = []  # every thread's own connection, closed with the store
        self._last_token_purge = 0.0
        self.migrate()

    # -- connections ---------------------------------------------------------------
    def _open_writer_lock(self) -> int:
        try:
            return os.open(self.writer_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open the SQLite writer lock {self.writer_lock}: {exc.strerror}") from None

    def _connect_sqlite(self) -> _SqliteConnection:
        conn = sqlite3.connect(
            self.path, timeout=30, isolation_level=None, check_same_thread=False, factory=_SqliteConnection
        )
        try:
            conn.writer_fd = self._open_writer_lock()
            deadline = time.monotonic() + 30
            while True:  # switching to WAL takes a lock the busy handler does not wait for
                try:
                    conn.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            conn.close()
            raise
        try:
            os.chmod(self.path, 0o600)
        except OSError:
            pass
        return conn

    def _connect_pg(self) -> Any:
        import psycopg

        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreError(
                f"cannot connect to PostgreSQL: {first}",
                "check --db (postgresql://USER@HOST:PORT/DB) and that the server runs",
            ) from None

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s") if self.dialect == "postgresql" else statement

    @contextmanager
    def without_waiting(self) -> Iterator[None]:
        """Within it, this thread's statements do not wait for another writer: they raise Busy instead.

        SQLite only. For an event loop that runs short database work itself: a write that finds
        SQLite's lock taken (another worker, an admin thread, any other process on the database)
        for more than NOWAIT_BUSY_MS fails before it has any effect, and the caller hands its work
        to a thread that may wait. The thread uses a connection of its own with that busy timeout,
        and takes no turn on the writers' lock file: a pool thread holds its turn while it waits
        for the interpreter lock, which the loop holds, so a loop that queued there waited for
        milliseconds, and one that refused to queue handed most of its writes to the pool."""
        if self.dialect != "sqlite":
            raise StoreError("only a SQLite store can refuse to wait")
        self._nowait.active = True
        try:
            yield
        finally:
            self._nowait.active = False

    def _nowait_connection(self) -> _SqliteConnection:
        conn: _SqliteConnection | None = self._nowait.conn
        if conn is None:
            conn = self._connect_sqlite()
            conn.execute(f"PRAGMA busy_timeout={NOWAIT_BUSY_MS}")
            conn.execute(f"PRAGMA wal_autocheckpoint={NOWAIT_AUTOCHECKPOINT}")
            self._nowait.conn = conn
            with self._refusal_lock:
                self._nowait_conns.append(conn)
        return conn

    def checkpoint(self) -> None:
        """Copy SQLite's write-ahead log into the database, for a thread to run: PASSIVE, so it
        neither waits for nor blocks writers and readers, and takes no writer's turn. A loop's own
        connection (without_waiting) leaves checkpoints to this; nothing to do on PostgreSQL."""
        if self.dialect != "sqlite":
            return
        conn = self._pool.get()
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except BaseException:
            self._pool.discard(conn)
            raise
        self._pool.put(conn)

    def _nowait_run(self, run: Callable[[Any], T]) -> T:
        """run(connection) on this thread's own connection, refusing to wait for a lock (Busy)."""
        conn = self._nowait_connection()
        try:
            return run(conn)
        except sqlite3.OperationalError as exc:
            if _busy(exc):
                raise Busy() from None
            raise

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A cursor inside one transaction (BEGIN IMMEDIATE on SQLite)."""
        if self._nowait.active:
            cur = self._nowait_connection().cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if _busy(exc):
                    raise Busy() from None
                raise
            try:
                yield _Cursor(cur, self._sql)
                cur.execute("COMMIT")
            except BaseException as exc:
                if cur.connection.in_transaction:  # a failed COMMIT too: this thread's connection is reused
                    cur.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError) and _busy(exc):
                    raise Busy() from None
                raise
            return
        with self._pool.connection() as conn, _turn(conn):
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN")
            try:
                yield _Cursor(cur, self._sql)
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")

    def query(self, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self._nowait.active:
            return self._nowait_run(lambda conn: conn.execute(statement, args).fetchall())
        conn = self._pool.get()
        try:
            with nullcontext() if statement.startswith("SELECT") else _turn(conn):
                rows: list[tuple[Any, ...]] = conn.execute(self._sql(statement), args).fetchall()
        except BaseException:
            self._pool.discard(conn)
            raise
        self._pool.put(conn)
        return rows

    def execute(self, statement: str, args: tuple[Any, ...] = ()) -> int:
        if self._nowait.active:
            return self._nowait_run(lambda conn: int(conn.execute(statement, args).rowcount))
        conn = self._pool.get()
        try:
            with _turn(conn):
                count: int = conn.execute(self._sql(statement), args).rowcount
        except BaseException:
            self._pool.discard(conn)
            raise
        self._pool.put(conn)
        return count

    def close(self) -> None:
        try:
            self.flush_refusals()
        except Exception:  # closing must not fail on a database that is already gone
            pass
        self._pool.close()
        with self._refusal_lock:
            conns, self._nowait_conns = self._nowait_conns, []
        for conn in conns:
            try:
                conn.close()
            except Exception:
                pass

    # -- migrations ------------------------------------------------------------------
    def schema_version(self) -> int:
        try:
            rows = self.query("SELECT value FROM kbs_meta WHERE key = 'schema_version'")
        except Exception:
            return 0
        return int(rows[0][0]) if rows else 0

    def migrate(self) -> None:
        """Apply the migrations this database has not seen, under a lock."""
        try:
            with self._pool.connection() as conn, _turn(conn):
                cur = conn.cursor()
                if self.dialect == "postgresql":
                    cur.execute("SELECT pg_advisory_lock(%s)", (_PG_LOCK,))
                else:
                    cur.execute("BEGIN IMMEDIATE")
                try:
                    current = self._version_on(cur)
                    if current > SCHEMA_VERSION:
                        raise StoreError(
                            f"the database schema is version {current}, newer than this broker's {SCHEMA_VERSION}",
                            "upgrade Cove",
                        )
                    for version, _description, statements in MIGRATIONS:
                        if version <= current:
                            continue
                        if self.dialect == "postgresql":
                            cur.execute("BEGIN")
                        for statement in statements:
                            cur.execute(_fill(statement, self.dialect))
                        cur.execute(
                            self._sql(
                                "INSERT INTO kbs_meta (key, value) VALUES (?, ?) "
                                "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
                            ),
                            ("schema_version", str(version)),
                        )
                        if self.dialect == "postgresql":
                            cur.execute("COMMIT")
                    if self.dialect == "sqlite":
                        cur.execute("COMMIT")
                except BaseException:
                    try:
                        cur.execute("ROLLBACK")
                    except Exception:
                        pass
                    raise
                finally:
                    if self.dialect == "postgresql":
                        cur.execute("SELECT pg_advisory_unlock(%s)", (_PG_LOCK,))
        except StoreError:
            raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot use the SQLite database {self.url}: {exc}") from None
        except Exception as exc:
            if type(exc).__module__.startswith("psycopg"):
                raise StoreError(f"cannot prepare the PostgreSQL database: {str(exc).strip()}") from None
            raise

    def _version_on(self, cur: Any) -> int:
        if self.dialect == "sqlite":
            cur.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='kbs_meta'")
        else:
            cur.execute("SELECT tablename FROM pg_tables WHERE tablename = 'kbs_meta'")
        if not cur.fetchall():
            return 0
        cur.execute("SELECT value FROM kbs_meta WHERE key = 'schema_version'")
        rows = cur.fetchall()
        return int(rows[0][0]) if rows else 0

    # -- meta and broker keys ------------------------------------------------------
    def meta(self, key: str) -> str | None:
        rows = self.query("SELECT value FROM kbs_meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta_once(self, key: str, value: str) -> str:
        """Store value under key unless one is there; return what is stored."""
        self.execute("INSERT INTO kbs_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (key, value))
        return self.meta(key)  # type: ignore[return-value]

    def broker_key(self, name: str) -> bytes | None:
        rows = self.query("SELECT sealed FROM kbs_keys WHERE name = ?", (name,))
        return bytes(rows[0][0]) if rows else None

    def add_broker_key_once(self, name: str, sealed: bytes) -> bytes:
        self.execute(
            "INSERT INTO kbs_keys (name, sealed, created_at) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING",
            (name, sealed, time.time()),
        )
        return self.broker_key(name)  # type: ignore[return-value]

    # -- sessions ----------------------------------------------------------------------
    def create_session(self, session_id: str, nonce: str, tee: str, lifetime: float, now: float) -> None:
        self.execute(
            "INSERT INTO sessions (id, nonce, tee, state, created_at, expires_at) VALUES (?, ?, ?, 'challenged', ?, ?)",
            (session_id, nonce, tee, now, now + lifetime),
        )

    def session(self, session_id: str) -> SessionRow | None:
        rows = self.query(
            "SELECT id, nonce, tee, state, created_at, expires_at, claims, tee_pubkey FROM sessions WHERE id = ?",
            (session_id,),
        )
        return self._session_row(rows[0]) if rows else None

    @staticmethod
    def _session_row(r: Sequence[Any]) -> SessionRow:
        return SessionRow(
            r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]) if r[6] else None, json.loads(r[7]) if r[7] else None
        )

    def claim_challenge(self, session_id: str, nonce: str, now: float) -> str | None:
        """Consume a live session's nonce in one statement; its tee, or None (to find out why, read it)."""
        rows = self.query(
            "UPDATE sessions SET state = 'appraising' WHERE id = ? AND nonce = ? "
            "AND state = 'challenged' AND expires_at > ? RETURNING tee",
            (session_id, nonce, now),
        )
        return rows[0][0] if rows else None

    def finish_session(
        self,
        session_id: str,
        ok: bool,
        claims: dict[str, Any] | None,
        tee_pubkey: dict[str, Any] | None,
        lifetime: float,
        now: float,
        audit: tuple[Any, ...] | None = None,
    ) -> None:
        """Record an appraisal's outcome, and with it (atomically) audit = (actor, action, outcome,
        resource, measurement, detail) if given."""
        statement = "UPDATE sessions SET state = ?, claims = ?, tee_pubkey = ?, expires_at = ? WHERE id = ?"
        args = (
            "attested" if ok else "failed",
            json.dumps(claims) if claims is not None else None,
            json.dumps(tee_pubkey) if tee_pubkey is not None else None,
            now + lifetime,
            session_id,
        )
        if audit is None:
            self.execute(statement, args)
        else:
            self._with_audit(statement, args, audit)

    def _with_audit(self, statement: str, args: tuple[Any, ...], audit: tuple[Any, ...]) -> None:
        """A write and its audit entry together: one statement on PostgreSQL (one round trip), one
        transaction (one commit) on SQLite."""
        entry = (time.time(), *audit)
        if self.dialect == "postgresql":
            self.execute(f"WITH done AS ({statement}) {_AUDIT_INSERT}", args + entry)
            return
        with self.transaction() as cur:
            cur.run(statement, args)
            cur.run(_AUDIT_INSERT, entry)

    def purge_sessions(self, before: float) -> int:
        return self.execute("DELETE FROM sessions WHERE expires_at < ?", (before,))

    def count_sessions(self) -> int:
        return int(self.query("SELECT COUNT(*) FROM sessions")[0][0])

    # -- policies ----------------------------------------------------------------------
    def put_policy(self, name: str, body: str) -> int:
        now = time.time()
        with self.transaction() as cur:
            rows = cur.fetch("SELECT version FROM policies WHERE name = ?", (name,))
            if rows:
                version = int(rows[0][0]) + 1
                cur.run(
                    "UPDATE policies SET body = ?, version = ?, updated_at = ? WHERE name = ?",
                    (body, version, now, name),
                )
            else:
                version = 1
                cur.run(
                    "INSERT INTO policies (name, body, version, created_at, updated_at) VALUES (?, ?, 1, ?, ?)",
                    (name, body, now, now),
                )
        return version

    def policy(self, name: str) -> tuple[str, int] | None:
        rows = self.query("SELECT body, version FROM policies WHERE name = ?", (name,))
        return (rows[0][0], int(rows[0][1])) if rows else None

    def policies(self) -> list[dict[str, Any]]:
        rows = self.query("SELECT name, version, updated_at FROM policies ORDER BY name")
        return [{"name": r[0], "version": int(r[1]), "updated_at": r[2]} for r in rows]

    def delete_policy(self, name: str) -> bool:
        return self.execute("DELETE FROM policies WHERE name = ?", (name,)) == 1

    def policy_in_use(self, name: str) -> list[str]:
        return [r[0] for r in self.query("SELECT path FROM secrets WHERE policy = ? ORDER BY path", (name,))]

    # -- secrets -------------------------------------------------------------------------
    def create_secret(self, row: SecretRow, sealed: bytes, actor: str) -> bool:
        with self.transaction() as cur:
            if cur.fetch("SELECT 1 FROM secrets WHERE path = ?", (row.path,)):
                return False
            cur.run(
                "INSERT INTO secrets (path, kind, params, policy, exportable, current_version, public, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?)",
                (
                    row.path,
                    row.kind,
                    json.dumps(row.params),
                    row.policy,
                    int(row.exportable),
                    json.dumps(row.public) if row.public is not None else None,
                    row.created_at,
                    row.updated_at,
                ),
            )
            cur.run("DELETE FROM secret_versions WHERE path = ?", (row.path,))
            cur.run(
                "INSERT INTO secret_versions (path, version, sealed, created_at, created_by) VALUES (?, 1, ?, ?, ?)",
                (row.path, sealed, row.created_at, actor),
            )
        return True

    def add_version(self, path: str, version: int, sealed: bytes, public: dict[str, Any] | None, actor: str) -> bool:
        """Make version the current one (it must be current + 1: rotations do not race)."""
        now = time.time()
        with self.transaction() as cur:
            updated = cur.run(
                "UPDATE secrets SET current_version = ?, public = ?, updated_at = ? "
                "WHERE path = ? AND current_version = ?",
                (version, json.dumps(public) if public is not None else None, now, path, version - 1),
            )
            if updated != 1:
                return False
            cur.run(
                "INSERT INTO secret_versions (path, version, sealed, created_at, created_by) VALUES (?, ?, ?, ?, ?)",
                (path, version, sealed, now, actor),
            )
        return True

    def set_secret_policy(self, path: str, policy: str) -> bool:
        return (
            self.execute("UPDATE secrets SET policy = ?, updated_at = ? WHERE path = ?", (policy, time.time(), path))
            == 1
        )

    def secret(self, path: str) -> SecretRow | None:
        rows = self.query(
            "SELECT path, kind, params, policy, exportable, current_version, public, created_at, "
            "updated_at FROM secrets WHERE path = ?",
            (path,),
        )
        return self._secret_row(rows[0]) if rows else None

    @staticmethod
    def _secret_row(r: Sequence[Any]) -> SecretRow:
        return SecretRow(
            r[0], r[1], json.loads(r[2]), r[3], bool(r[4]), int(r[5]), json.loads(r[6]) if r[6] else None, r[7], r[8]
        )

    def secrets(self, prefix: str = "") -> list[SecretRow]:
        rows = self.query(
            "SELECT path, kind, params, policy, exportable, current_version, public, created_at, "
            "updated_at FROM secrets ORDER BY path"
        )
        return [self._secret_row(r) for r in rows if r[0].startswith(prefix)]

    def release_row(self, path: str, version: int | None) -> ReleaseRow | None:
        """What a release needs in one round trip: the secret, its policy (body, version) if it exists,
        and the sealed value of version (default: the current one) if it exists."""
        rows = self.query(
            f"SELECT {_RELEASE_COLUMNS} FROM secrets s {_RELEASE_JOINS} WHERE s.path = ?", (version, path)
        )
        return self._release_row(rows[0]) if rows else None

    def session_and_release_row(
        self, session_id: str, path: str, version: int | None
    ) -> tuple[SessionRow | None, ReleaseRow | None]:
        """A cookie session and :meth:`release_row`, together in one round trip."""
        r = self.query(
            "SELECT se.id, se.nonce, se.tee, se.state, se.created_at, se.expires_at, se.claims, "
            f"se.tee_pubkey, {_RELEASE_COLUMNS} FROM (SELECT 1 AS one) one "
            f"LEFT JOIN sessions se ON se.id = ? LEFT JOIN secrets s ON s.path = ? {_RELEASE_JOINS}",
            (session_id, path, version),
        )[0]
        return (
            self._session_row(r[:8]) if r[0] is not None else None,
            self._release_row(r[8:]) if r[8] is not None else None,
        )

    def _release_row(self, r: Sequence[Any]) -> ReleaseRow:
        return (
            self._secret_row(r),
            (r[9], int(r[10])) if r[9] is not None else None,
            bytes(r[11]) if r[11] is not None else None,
        )

    def sealed_version(self, path: str, version: int) -> bytes | None:
        rows = self.query("SELECT sealed FROM secret_versions WHERE path = ? AND version = ?", (path, version))
        return bytes(rows[0][0]) if rows else None

    def versions(self, path: str) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT version, created_at, created_by FROM secret_versions WHERE path = ? ORDER BY version", (path,)
        )
        return [{"version": int(r[0]), "created_at": r[1], "created_by": r[2]} for r in rows]

    def delete_secret(self, path: str) -> bool:
        with self.transaction() as cur:
            cur.run("DELETE FROM secret_versions WHERE path = ?", (path,))
            deleted: bool = cur.run("DELETE FROM secrets WHERE path = ?", (path,)) == 1
        return deleted

    # -- admin keys ------------------------------------------------------------------------
    def add_admin_key(self, name: str, jwk: dict[str, Any], role: str) -> bool:
        with self.transaction() as cur:
            if cur.fetch("SELECT 1 FROM admin_keys WHERE name = ?", (name,)):
                return False
            cur.run(
                "INSERT INTO admin_keys (name, jwk, role, created_at) VALUES (?, ?, ?, ?)",
                (name, json.dumps(jwk), role, time.time()),
            )
        return True

    def admin_key(self, name: str) -> tuple[dict[str, Any], str] | None:
        rows = self.query("SELECT jwk, role FROM admin_keys WHERE name = ?", (name,))
        return (json.loads(rows[0][0]), rows[0][1]) if rows else None

    def admin_keys(self) -> list[dict[str, Any]]:
        rows = self.query("SELECT name, role, created_at FROM admin_keys ORDER BY name")
        return [{"name": r[0], "role": r[1], "created_at": r[2]} for r in rows]

    def delete_admin_key(self, name: str) -> bool:
        return self.execute("DELETE FROM admin_keys WHERE name = ?", (name,)) == 1

    # -- audit ---------------------------------------------------------------------------------
    def audit(
        self,
        actor: str,
        action: str,
        outcome: str,
        resource: str | None = None,
        measurement: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.execute(_AUDIT_INSERT, (time.time(), actor, action, outcome, resource, measurement, detail))

    def audit_refusal(self, actor: str, action: str, resource: str | None, detail: str) -> None:
        """Audit a refusal; a flood of identical ones is counted rather than written one by one.

        The first refusal of a kind (actor, action, resource, detail) is written at once; repeats
        within REFUSAL_WINDOW seconds only count, and the count is written as one more entry
        ("repeated N times") when the window has passed (at the next refusal, or at close).
        """
        key = (actor, action, resource, detail[:500])
        now = time.monotonic()
        with self._refusal_lock:
            expired = [k for k, (since, _n) in self._refusals.items() if now - since >= REFUSAL_WINDOW]
            due = [(k, n) for k in expired for _since, n in (self._refusals.pop(k),) if n]
            seen = self._refusals.get(key)
            if seen is not None:
                self._refusals[key] = (seen[0], seen[1] + 1)
            elif len(self._refusals) < 10000:
                self._refusals[key] = (now, 0)
        entries = [(*k[:2], "refused", k[2], None, f"{k[3]} (repeated {n} more times)") for k, n in due]
        if seen is None:
            entries.append((actor, action, "refused", resource, None, detail[:500]))
        try:
            self._audit_entries(entries)
        except BaseException:  # nothing was written (Busy, or a failed database): count it all again later
            with self._refusal_lock:
                for k, n in due:
                    self._refusals.setdefault(k, (now - REFUSAL_WINDOW, n))
                if seen is None and self._refusals.get(key) == (now, 0):
                    del self._refusals[key]
            raise

    def _audit_entries(self, entries: list[tuple[Any, ...]]) -> None:
        """Audit entries (actor, action, outcome, resource, measurement, detail), all or none."""
        if len(entries) == 1:
            self.execute(_AUDIT_INSERT, (time.time(), *entries[0]))
        elif entries:
            with self.transaction() as cur:
                for entry in entries:
                    cur.run(_AUDIT_INSERT, (time.time(), *entry))

    def flush_refusals(self) -> None:
        """Write the counts of refusals still inside their window."""
        with self._refusal_lock:
            pending = [(k, n) for k, (_since, n) in self._refusals.items() if n]
            self._refusals.clear()
        for (a, act, res, det), count in pending:
            self.audit(a, act, "refused", res, None, f"{det} (repeated {count} more times)")

    # -- used admin tokens ------------------------------------------------------------------------
    def use_token_id(self, token_id: str, expires_at: float, now: float) -> bool:
        """Record a token id as used until expires_at; False if it was used before (a replay)."""
        if self.dialect == "sqlite":
            statement = "INSERT OR IGNORE INTO used_tokens (id, expires_at) VALUES (?, ?)"
        else:
            statement = "INSERT INTO used_tokens (id, expires_at) VALUES (?, ?) ON CONFLICT (id) DO NOTHING"
        fresh = self.execute(statement, (token_id, expires_at)) == 1
        if fresh and now - self._last_token_purge > 60:
            self._last_token_purge = now
            self.execute("DELETE FROM used_tokens WHERE expires_at < ?", (now - 60,))
        return fresh

    def audit_log(self, since_id: int = 0, limit: int = 100, action: str | None = None) -> list[dict[str, Any]]:
        statement = "SELECT id, at, actor, action, resource, measurement, outcome, detail FROM audit WHERE id > ?"
        args: tuple[Any, ...] = (since_id,)
        if action:
            statement += " AND action = ?"
            args += (action,)
        statement += " ORDER BY id LIMIT ?"
        rows = self.query(statement, args + (limit,))
        keys = ("id", "at", "actor", "action", "resource", "measurement", "outcome", "detail")
        return [dict(zip(keys, r)) for r in rows]


_RELEASE_COLUMNS = (
    "s.path, s.kind, s.params, s.policy, s.exportable, s.current_version, s.public, s.created_at, "
    "s.updated_at, p.body, p.version, v.sealed"
)
_RELEASE_JOINS = (
    "LEFT JOIN policies p ON p.name = s.policy LEFT JOIN secret_versions v ON v.path = s.path "
    "AND v.version = COALESCE(?, s.current_version)"
)
_AUDIT_INSERT = (
    "INSERT INTO audit (at, actor, action, outcome, resource, measurement, detail) VALUES (?, ?, ?, ?, ?, ?, ?)"
)


class _SqliteConnection(sqlite3.Connection):
    """A SQLite connection with its own descriptor of the database's writer lock file.

    Writers to one SQLite database take turns with an exclusive flock on that
    file. flock treats each open file description on its own, so the
    connections of one process queue for it as those of other processes do; a
    waiter sleeps in the kernel (without the GIL) and is woken as soon as the
    holder is done, where SQLite's busy handler would sleep 1, 2, 5 ... ms
    between tries. A turn is not re-entrant: a thread holding one must not
    write through another connection before it ends (nothing here does).
    """

    writer_fd: int = -1

    def take_turn(self) -> _Turn:
        return _Turn(self.writer_fd)

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.writer_fd >= 0:
                os.close(self.writer_fd)
                self.writer_fd = -1


class _Turn:
    """Holds a writer lock file's flock for the length of a with block."""

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


def _busy(exc: sqlite3.OperationalError) -> bool:
    """SQLite answered SQLITE_BUSY or SQLITE_LOCKED (another connection holds the lock)."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _turn(conn: Any) -> _Turn | nullcontext[None]:
    """The writer's turn on a SQLite connection; nothing to take on PostgreSQL (it locks rows)."""
    return conn.take_turn() if isinstance(conn, _SqliteConnection) else nullcontext()


class _Cursor:
    """A cursor inside :meth:`Store.transaction` with the dialect's placeholders."""

    def __init__(self, cur: Any, sql: Callable[[str], str]):
        self._cur, self._sqlf = cur, sql

    def run(self, statement: str, args: tuple[Any, ...] = ()) -> int:
        self._cur.execute(self._sqlf(statement), args)
        count: int = self._cur.rowcount
        return count

    def fetch(self, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        self._cur.execute(self._sqlf(statement), args)
        return list(self._cur.fetchall())
