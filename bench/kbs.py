"""bench/kbs: the key broker under load, whole KBS flows with Cove evidence.

    .venv/bin/python bench/kbs.py [--db sqlite|postgresql|both] [--clients 1,8,32,128]
                                  [--seconds 10] [--runs 3] [--rss-flows 20000] [--workers 1]
                                  [--no-restart] [--no-baseline] [--flood [--flood-connections 2000]]
                                  [--in-process 2000 [--profile]] [--fresh-tee-keys]

The broker runs as `cove kbs serve` (HTTPS on 127.0.0.1, its own process);
this process is the load generator: N concurrent clients (asyncio, one
keep-alive TLS connection each, a minimal HTTP/1.1 client), each looping auth → attest (Cove evidence from
a private, self-certified platform key, bound to the nonce and the client's TEE
key) → resource (a JWE, decrypted and compared with the value uploaded). Each client reuses one
TEE key for all its flows (a benchmark choice that leaves the server more of the shared cores; the
output says so); --fresh-tee-keys makes a new one per flow, as real clients do.
Printed per N, the median of --runs timed runs: flows/s, p50 and p99 flow
latency, errors, the server's CPU time per flow (far steadier than flows/s
on a shared machine) and the load average; each next to a baseline measured
the same way, interleaved with it (the same clients doing three GETs of a
trivial endpoint, /kbs/v0/jwks, per "flow": the server stack and TLS
without the broker's work); with --workers N > 1, each worker's share of the
workers' CPU in each run (how evenly connections were spread). Then the server's resident
memory before and after --rss-flows more flows (and after each 20,000),
and a restart of the server in the middle of a run: clients retry (from
auth) and every secret received must equal the one stored. With --flood, the
memory floods of the security review: ten unauthenticated 50 MB admin POSTs,
then 2,000 concurrent /auth requests three times, with the server's RSS and
peak RSS after each. Loops are bounded in count and time; traffic
goes to loopback only. PostgreSQL runs as a throwaway server (tests/kbs/pgserver.py).
With --in-process N, first the broker's own work per flow: N flows (auth, attest, release) called
on a Broker object in this process, on the same database, without HTTP, TLS or threads; the CPU
time per flow is what the server spends beyond its HTTP stack; --profile prints where it goes
(cProfile, the cove, sqlite3, psycopg and cryptography functions by cumulative time).
The load generator runs on uvloop (installed with uvicorn[standard]); BENCH_KBS_LOOP=asyncio runs it on
asyncio's own loop.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COVE = str(Path(sys.executable).parent / "cove")
SECRET_PATH = "bench/db/password"
SECRET_VALUE = b"bench-secret-" + os.urandom(8).hex().encode()
# Each client makes one TEE key and uses it for all its flows (a new nonce, evidence and session each
# time): the load generator then costs less of the two cores it shares with the server. A benchmark
# choice, printed with the figures: real clients make a key per attestation, and the server imports
# a key it has seen before from its cache. --fresh-tee-keys makes one per flow.
FRESH_TEE_KEYS = False
UVLOOP = os.environ.get("BENCH_KBS_LOOP", "uvloop") == "uvloop"
PROFILE = False  # --profile: cProfile the --in-process flows  # BENCH_KBS_LOOP=asyncio for asyncio's loop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`cove kbs serve` in its own process group."""

    def __init__(self, state: Path, db: str, workers: int, env: dict):
        self.state, self.db, self.workers, self.env = state, db, workers, env
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        policy = self.state / "attestation-policy.toml"
        policy.write_text('types = ["cove"]\n[cove]\nself_certified = true\n')
        self.log = open(self.state / "serve.log", "ab")
        self.process = subprocess.Popen(
            [
                COVE,
                "kbs",
                "serve",
                "--state",
                str(self.state),
                "--db",
                self.db,
                "--listen",
                f"127.0.0.1:{self.port}",
                "--policy",
                str(policy),
                "--workers",
                str(self.workers),
            ],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"cove kbs serve exited: {(self.state / 'serve.log').read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", verify=False, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise SystemExit("cove kbs serve did not come up in 60 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the server process and its workers."""
        total = 0.0
        pids = [self.process.pid]
        try:
            pids += [
                int(p) for p in Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
            ]
        except OSError:
            pass
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                pass
        return total

    def worker_cpu(self) -> dict[int, float]:
        """CPU seconds of each worker process (--workers N > 1), by pid."""
        per_pid = {}
        for pid in self._pids()[1:]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                per_pid[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                pass
        return per_pid

    def _pids(self) -> list[int]:
        pids = [self.process.pid]
        try:
            pids += [
                int(p) for p in Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
            ]
        except OSError:
            pass
        return pids

    def reset_peak(self) -> None:
        """Reset the peak resident memory (VmHWM) of the server's processes to their current RSS."""
        for pid in self._pids():
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                pass

    def peak_mb(self) -> float:
        """Sum of the peak resident memory (VmHWM) of the server's processes since reset_peak."""
        total = 0
        for pid in self._pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def rss_mb(self) -> float:
        """Resident memory of the server process and its workers."""
        total = 0
        pids = [self.process.pid]
        try:
            pids += [
                int(p) for p in Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
            ]
        except OSError:
            pass
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024


class Evidence:
    """Cove evidence from a private self-certified platform (what the runtime sends)."""

    def __init__(self):
        from cove.platform import monitor
        from cove.platform.reports import EnclaveClaims

        self.signer = monitor.signer()
        self.claims = EnclaveClaims(
            bytes.fromhex("ab" * 32), bytes(32), 1, 1, False, "sim", "namespaces+seccomp", "bench"
        )

    def make(self, report_data: bytes) -> dict:
        return {"evidence": base64.b64encode(self.signer.evidence(self.claims, report_data)).decode()}


class Stats:
    def __init__(self):
        self.latencies: list[float] = []
        self.errors = 0
        self.retries = 0
        self.corrupted = 0
        self.last_error = ""


class Connection:
    """A minimal keep-alive HTTP/1.1 client over TLS: the load generator must cost less than the server.

    (httpx spends several milliseconds of CPU per request in this setting, more than the broker does.)
    """

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext):
        self.host, self.port, self.ctx = host, port, ctx
        self.reader = self.writer = None
        self.cookie: str | None = None
        self.tee_key = None  # (private JWK, public JWK), reused by this client's flows unless FRESH_TEE_KEYS

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.ctx, server_hostname=self.host
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

    async def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        if self.writer is None:
            await self.open()
        payload = json.dumps(body).encode() if body is not None else b""
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", "Accept: application/json"]
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
        if self.cookie:
            head.append(f"Cookie: kbs-session-id={self.cookie}")
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        length, close = 0, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.lower() == "close":
                close = True
            elif name == "set-cookie" and value.startswith("kbs-session-id="):
                self.cookie = value.split(";", 1)[0].split("=", 1)[1]
        data = await self.reader.readexactly(length) if length else b""
        if close:
            self.close()
        return status, data


class HttpStatusError(Exception):
    pass


async def flow(conn: Connection, evidence: Evidence, stats: Stats) -> None:
    from cove.kbs import evidence_appraisal, jose

    conn.cookie = None
    status, data = await conn.request("POST", "/kbs/v0/auth", {"version": "0.1.1", "tee": "cove", "extra-params": {}})
    if status != 200:
        raise HttpStatusError(status, data[:200])
    if FRESH_TEE_KEYS or conn.tee_key is None:
        fresh = jose.new_tee_key()
        conn.tee_key = (fresh, jose.public_jwk(fresh))
    key, public = conn.tee_key
    runtime = {"nonce": json.loads(data)["nonce"], "tee-pubkey": public}
    status, data = await conn.request(
        "POST",
        "/kbs/v0/attest",
        {"runtime-data": runtime, "tee-evidence": evidence.make(evidence_appraisal.expected_report_data(runtime))},
    )
    if status != 200:
        raise HttpStatusError(status, data[:200])
    status, data = await conn.request("GET", f"/kbs/v0/resource/{SECRET_PATH}")
    if status != 200:
        raise HttpStatusError(status, data[:200])
    if jose.decrypt_from(json.loads(data), key) != SECRET_VALUE:
        stats.corrupted += 1


async def null_flow(conn: Connection, evidence: Evidence, stats: Stats) -> None:
    """The baseline: three requests, like a flow, to a trivial endpoint (the token keys) of the same
    server stack over the same TLS connection; no database, no crypto."""
    for _ in range(3):
        status, data = await conn.request("GET", "/kbs/v0/jwks")
        if status != 200:
            raise HttpStatusError(status, data[:200])


async def client(
    url: str,
    ctx: ssl.SSLContext,
    evidence: Evidence,
    stats: Stats,
    stop_at: float,
    max_flows: int,
    counter: list[int],
    retry: bool,
    one_flow=flow,
) -> None:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    conn = Connection(host, int(port), ctx)
    try:
        while time.monotonic() < stop_at and counter[0] < max_flows:
            counter[0] += 1
            started = time.perf_counter()
            for attempt in range(50 if retry else 1):
                try:
                    await one_flow(conn, evidence, stats)
                    stats.latencies.append(time.perf_counter() - started)
                    break
                except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, HttpStatusError) as exc:
                    conn.close()
                    transient = not isinstance(exc, HttpStatusError) or exc.args[0] >= 500
                    if retry and transient and time.monotonic() < stop_at + 60:
                        stats.retries += 1
                        await asyncio.sleep(0.05 * min(attempt + 1, 10))
                        continue
                    stats.errors += 1
                    stats.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                    break
    finally:
        conn.close()


def run_load(
    url: str,
    ca: Path,
    evidence: Evidence,
    clients: int,
    seconds: float,
    max_flows: int,
    retry: bool = False,
    during=None,
    one_flow=flow,
) -> tuple[Stats, float]:
    ctx = ssl.create_default_context(cafile=str(ca))
    stats = Stats()
    counter = [0]

    async def main() -> float:
        stop_at = time.monotonic() + seconds
        started = time.perf_counter()
        tasks = [
            asyncio.create_task(client(url, ctx, evidence, stats, stop_at, max_flows, counter, retry, one_flow))
            for _ in range(clients)
        ]
        if during is not None:
            await asyncio.sleep(seconds / 3)
            await asyncio.get_running_loop().run_in_executor(None, during)
        await asyncio.gather(*tasks)
        return time.perf_counter() - started

    if UVLOOP:  # uvloop's event loop and TLS cost the load generator less CPU per flow than asyncio's
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            elapsed = runner.run(main())
    else:
        elapsed = asyncio.run(main())
    return stats, elapsed


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_db(kind: str, args, pg) -> None:
    folder = Path(tempfile.mkdtemp(prefix=f"cove-bench-kbs-{kind}-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVE_")}
    env.update(COVE_KBS_STATE=str(folder / "state"), COVE_PLATFORM_DIR=str(folder / "platform"))
    os.environ["COVE_PLATFORM_DIR"] = env["COVE_PLATFORM_DIR"]
    (folder / "platform").mkdir(mode=0o700)
    db = (
        f"sqlite:///{folder / 'state' / 'kbs.db'}"
        if kind == "sqlite"
        else pg.create_database("bench_" + os.urandom(4).hex())
    )
    done = subprocess.run([COVE, "kbs", "init", "--db", db], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    state = folder / "state"
    server = Server(state, db, args.workers, env)
    server.start()
    try:
        from cove.kbs.client import AdminClient

        admin = AdminClient.from_file(server.url, state / "admin.json", state / "tls-ca.pem")
        admin.put_policy(
            "bench", 'types = ["cove"]\n[cove]\nmeasurements = ["' + "ab" * 32 + '"]\nself_certified = true\n'
        )
        admin.create_secret(SECRET_PATH, "data", "bench", value=SECRET_VALUE)
        evidence = Evidence()
        ca = state / "tls-ca.pem"
        if args.in_process:
            in_process(db, state, evidence, args.in_process, kind)
        print(
            f"\n== {kind} ({args.workers} server worker{'s' if args.workers > 1 else ''}, HTTPS, "
            f"{os.cpu_count()} cores shared with the load generator; load average "
            f"{os.getloadavg()[0]:.2f} before the run) =="
        )
        print(
            "TEE keys: a new one per flow (--fresh-tee-keys)"
            if FRESH_TEE_KEYS
            else "TEE keys: one per client, reused across its flows (a benchmark choice: real clients make one "
            "per attestation; --fresh-tee-keys)"
        )
        print(
            f"{'clients':>8} {'flows':>7} {'flows/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
            f"{'server CPU':>10} {'CPU/flow':>9} {'client CPU':>10} {'load':>5}"
        )
        for n in args.clients:
            run_load(server.url, ca, evidence, n, 1.0, 10**9)  # warm up connections and caches
            runs, baselines = [], []
            for _ in range(args.runs):  # interleaved, so that both see the same machine
                runs.append(measure(server, ca, evidence, n, args.seconds))
                if not args.no_baseline:
                    baselines.append(measure(server, ca, evidence, n, args.seconds, one_flow=null_flow))
            for label, measured in (("", runs), ("baseline", baselines)):
                if not measured:
                    continue
                row = {
                    key: statistics.median(r[key] for r in measured)
                    for key in measured[0]
                    if key not in ("last_error", "split")
                }
                splits = ", ".join(r["split"] for r in measured if r["split"])
                errors = sum(r["errors"] for r in measured)
                print(
                    f"{n:>8} {row['flows']:>7.0f} {row['rate']:>8.1f} {row['p50']:>8.1f} {row['p99']:>8.1f} "
                    f"{errors:>7} {row['server']:>9.0%} {row['cpu_per_flow']:>6.2f} ms {row['client']:>9.0%} "
                    f"{row['load']:>5.2f}"
                    + (f"  {label}" if label else "")
                    + (f"  workers' CPU split % {splits}" if splits else "")
                    + (f"  last error: {measured[-1]['last_error']}" if errors else "")
                )
            if baselines:
                rate = statistics.median(r["rate"] for r in runs)
                base = statistics.median(r["rate"] for r in baselines)
                print(
                    f"{'':>8} whole flows at {rate / base:.0%} of the baseline's rate "
                    f"(baseline: 3 x GET /kbs/v0/jwks per flow, same stack, same TLS)"
                )
        if args.rss_flows:
            rss_run(server, ca, evidence, args.rss_flows, db)
        if args.flood:
            flood(server, ca, args.flood_connections, args.flood_rounds)
        if not args.no_restart:

            def restart():
                server.stop()
                time.sleep(0.5)
                server.start()

            stats, elapsed = run_load(
                server.url, ca, evidence, 32, max(args.seconds, 6), 10**9, retry=True, during=restart
            )
            listed = admin.secrets()
            intact = admin.export(SECRET_PATH) == SECRET_VALUE and [s["path"] for s in listed] == [SECRET_PATH]
            print(
                f"restart mid-run: {len(stats.latencies)} flows, {stats.retries} retries, errors "
                f"{stats.errors}, corrupted {stats.corrupted}, secret intact after restart: {intact}"
            )
        admin.close()
    finally:
        server.stop()


def in_process(db: str, state: Path, evidence: Evidence, flows: int, kind: str) -> None:
    """The broker's own CPU per flow: auth, attest and release called directly, the evidence made beforehand."""
    from cove.kbs import evidence_appraisal, jose, vault
    from cove.kbs.broker import Broker, Settings

    broker = Broker(
        Settings(
            db_url=db,
            master_key=vault.load_master_key(state / "master.key"),
            attestation_policy='types = ["cove"]\n[cove]\nself_certified = true\n',
        )
    )
    auth = {"version": "0.1.1", "tee": "cove", "extra-params": {}}
    try:
        prepared = []
        reused = jose.public_jwk(jose.new_tee_key())
        for _ in range(flows):
            session, challenge = broker.auth(auth)
            public = jose.public_jwk(jose.new_tee_key()) if FRESH_TEE_KEYS else reused
            runtime = {"nonce": challenge["nonce"], "tee-pubkey": public}
            body = json.dumps(
                {
                    "runtime-data": runtime,
                    "tee-evidence": evidence.make(evidence_appraisal.expected_report_data(runtime)),
                }
            )
            prepared.append((session, body))
        profiler = None
        if PROFILE:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        started = time.process_time()
        for session, body in prepared:
            broker.auth(auth)  # the flow's own auth (its session is not used further)
            broker.attest(session, json.loads(body))
            broker.release_to(session, None, SECRET_PATH)
        cpu = time.process_time() - started
        if profiler is not None:
            profiler.disable()
    finally:
        broker.store.close()
    if profiler is not None:  # where the broker's own CPU goes (cProfile slows it: the figure below is inflated)
        import pstats

        print(f"\n-- cProfile of the {flows} in-process flows ({kind}), by cumulative time --")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(r"cove|sqlite3|psycopg|cryptography", 30)
    print(
        f"broker work in process ({kind}, no HTTP, TLS or threads): {cpu * 1000 / flows:.2f} ms CPU per flow "
        f"({flows} flows, {'a TEE key per flow' if FRESH_TEE_KEYS else 'one TEE key'}"
        f"{'; under cProfile, so inflated' if PROFILE else ''})"
    )


def measure(server: Server, ca: Path, evidence: Evidence, clients: int, seconds: float, one_flow=flow) -> dict:
    """One timed run at N clients: rates, latencies, CPU (server CPU time per flow) and load average."""
    server_cpu, client_cpu, workers = server.cpu_seconds(), time.process_time(), server.worker_cpu()
    stats, elapsed = run_load(server.url, ca, evidence, clients, seconds, 10**9, one_flow=one_flow)
    server_cpu, client_cpu = server.cpu_seconds() - server_cpu, time.process_time() - client_cpu
    # each worker's share of the workers' CPU (processes that did next to nothing, e.g. multiprocessing's
    # resource tracker, left out): how evenly the kernel spread the connections
    spent = {pid: cpu - workers[pid] for pid, cpu in server.worker_cpu().items() if pid in workers}
    shares = sorted((cpu / sum(spent.values()) for cpu in spent.values() if cpu > 0.02 * elapsed), reverse=True)
    flows = len(stats.latencies)
    return {
        "flows": flows,
        "rate": flows / elapsed,
        "p50": percentile(stats.latencies, 0.5) * 1000,
        "p99": percentile(stats.latencies, 0.99) * 1000,
        "errors": stats.errors + stats.corrupted,
        "server": server_cpu / elapsed,
        "cpu_per_flow": server_cpu * 1000 / max(flows, 1),
        "client": client_cpu / elapsed,
        "load": os.getloadavg()[0],
        "last_error": stats.last_error,
        "split": "/".join(f"{share:.0%}".rstrip("%") for share in shares) if len(shares) > 1 else "",
    }


def rss_run(server: Server, ca: Path, evidence: Evidence, total: int, db: str) -> None:
    """The server's resident memory before, during (every 20,000 flows) and after `total` more flows."""
    before, marks, done, errors = server.rss_mb(), [], 0, 0
    started = time.perf_counter()
    while done < total:
        stats, _ = run_load(server.url, ca, evidence, 32, 3600, min(20000, total - done))
        done, errors = done + len(stats.latencies), errors + stats.errors + stats.corrupted
        marks.append(f"{server.rss_mb():.0f}")
        if not stats.latencies:
            break
    print(
        f"server RSS: {before:.0f} MB before, {marks[-1]} MB after {done} more flows (after each 20,000: "
        f"{', '.join(marks)} MB; {time.perf_counter() - started:.0f} s, errors {errors}); "
        f"sessions in the database: {_sessions(db)}"
    )


def flood(server: Server, ca: Path, connections: int, rounds: int) -> None:
    """The two memory floods of the security review, with the server's RSS (now and peak) after each.

    1. Ten concurrent unauthenticated POSTs to /kbs/v0/admin/secrets, each sending a 50 MB body.
    2. `connections` concurrent /auth requests (one TLS connection each), `rounds` times.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < connections + 256:
        raise SystemExit(f"--flood-connections {connections} needs `ulimit -n` of at least {connections + 256}")
    host, port = server.url.split("//", 1)[1].rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(ca))

    async def admin_post(size: int) -> str:
        reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname=host)
        writer.write(
            f"POST /kbs/v0/admin/secrets HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
        )
        block, sent, status = b" " * (1 << 20), 0, "none"
        try:
            answer = asyncio.ensure_future(reader.readline())
            while sent < size and not answer.done():
                writer.write(block)
                await writer.drain()
                sent += len(block)
            status = (await asyncio.wait_for(answer, 30)).decode().split(" ")[1]
        except (TimeoutError, OSError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()
        return f"{status} after {sent >> 20} MB"

    async def auth(done: list[int]) -> None:
        try:
            conn = Connection(host, int(port), ctx)
            status, _ = await conn.request("POST", "/kbs/v0/auth", {"version": "0.1.1", "tee": "cove"})
            done.append(status)
            conn.close()
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            done.append(type(exc).__name__)

    async def admin_flood() -> list[str]:
        return await asyncio.gather(*(admin_post(50_000_000) for _ in range(10)))

    async def auth_flood() -> list:
        done: list = []
        await asyncio.gather(*(auth(done) for _ in range(connections)))
        return done

    server.reset_peak()
    before = server.rss_mb()
    started = time.perf_counter()
    answers = asyncio.run(admin_flood())
    time.sleep(2)  # "after": once the broker has been idle for a moment
    print(
        f"flood 1, 10 x unauthenticated 50 MB POST /kbs/v0/admin/secrets ({time.perf_counter() - started:.1f} s): "
        f"answers {sorted(set(answers))}; server RSS {before:.0f} MB before, peak {server.peak_mb():.0f} MB, "
        f"{server.rss_mb():.0f} MB 2 s after"
    )
    for round_ in range(1, rounds + 1):
        server.reset_peak()
        before = server.rss_mb()
        started = time.perf_counter()
        statuses = asyncio.run(auth_flood())
        elapsed = time.perf_counter() - started
        time.sleep(2)
        counted = {str(k): statuses.count(k) for k in sorted(set(statuses), key=str)}
        print(
            f"flood 2, round {round_}: {connections} concurrent POST /kbs/v0/auth "
            f"({elapsed:.1f} s): {counted}; server RSS {before:.0f} MB before, "
            f"peak {server.peak_mb():.0f} MB, {server.rss_mb():.0f} MB 2 s after"
        )


def _sessions(db: str) -> int:
    from cove.kbs.store import Store

    store = Store(db)
    try:
        return store.count_sessions()
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 128])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rss-flows", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per N; the median is printed")
    parser.add_argument("--no-restart", action="store_true")
    parser.add_argument("--no-baseline", action="store_true", help="skip the trivial-endpoint baseline")
    parser.add_argument(
        "--flood", action="store_true", help="the memory floods: unauthenticated 50 MB admin POSTs, concurrent /auth"
    )
    parser.add_argument(
        "--fresh-tee-keys",
        action="store_true",
        help="a new TEE key per flow, as real clients do (default: one per client, reused)",
    )
    parser.add_argument("--flood-connections", type=int, default=2000)
    parser.add_argument("--flood-rounds", type=int, default=3)
    parser.add_argument(
        "--in-process",
        type=int,
        default=0,
        metavar="FLOWS",
        help="first measure the broker's own CPU per flow, in this process, over FLOWS flows",
    )
    parser.add_argument(
        "--profile", action="store_true", help="with --in-process: print a cProfile of the in-process flows"
    )
    args = parser.parse_args()
    global FRESH_TEE_KEYS, PROFILE
    FRESH_TEE_KEYS = args.fresh_tee_keys
    PROFILE = args.profile
    pg = None
    kinds = ("sqlite", "postgresql") if args.db == "both" else (args.db,)
    try:
        if "postgresql" in kinds:
            from tests.kbs.pgserver import PgMissing, PgServer

            try:
                pg = PgServer().start()
            except PgMissing as exc:
                raise SystemExit(str(exc)) from None
        for kind in kinds:
            bench_db(kind, args, pg)
    finally:
        if pg is not None:
            pg.stop()


if __name__ == "__main__":
    main()
