"""The node service (`cove daemon`): start cost with and without it, `cove ps`, quotes under load, scale.

Everything is measured in one run beside bare bwrap on the same images:
`cove run` of the static hello through a private daemon for a 0.8 MB image
and a ≥ 500 MB one (its first import reported apart, in MB/s), `cove run`
without the daemon, `cove ps` end to end, the p99 latency of
/dev/attestation/quote with 50 enclaves reading at once (each holds its
output and its exit until all have read), and 200 enclaves
(a sleep each) running together with the daemon's RSS and `cove ps`.

    .venv/bin/python bench/node.py [--runs 15] [--big-mb 520] [--quoters 50] [--many 200] [--spans N]

With ``--spans N`` it then runs each start path N more times with
COVE_TRACE_START and prints the median of each span (client, daemon's
supervisor, launcher, sandbox): where the milliseconds go.

The import is printed beside a plain copy of the same payload with fsync
(the disk's pace in the same run); the quotes with the server's CPU per
quote and its waits for a CPU (schedstat). ``--host-quoters N`` then has N
pid namespaces on the host read quotes from a node server of their own (no
daemon, supervisor or sandbox: the server's side alone). ``--no-starts``
skips the start figures, ``--keep`` keeps the work folder and its logs.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import COVE, HELLO, ROOT, bare_bwrap, timed  # noqa: E402 - the same helpers and hello


def run(*args: str, cwd: Path | None = None, env: dict, check: bool = True) -> str:
    return subprocess.run([COVE, *args], cwd=cwd, env=env, check=check, capture_output=True, text=True).stdout


def make(work: Path, name: str, env: dict, files: dict[str, Path], extra_mb: int = 0) -> Path:
    run("new", name, cwd=work, env=env)
    root = work / name
    for target, source in files.items():
        run("add", "--no-deps", "--to", target, str(source), cwd=root, env=env)
    if extra_mb:
        with open(root / "image" / "payload.bin", "wb") as handle:
            for _ in range(extra_mb):
                handle.write(os.urandom(1 << 20))
    run("build", cwd=root, env=env)
    return root


def size_mb(root: Path) -> float:
    return sum(p.stat().st_size for p in (root / "image").rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def spans(argv: list[str], runs: int, env: dict, trace: Path) -> dict[str, float]:
    """Median milliseconds of each COVE_TRACE_START span (cove.trace) over runs of argv."""
    found: dict[str, list[float]] = {}
    for _ in range(runs):
        trace.write_text("")
        subprocess.run(argv, env=dict(env, COVE_TRACE_START=str(trace)), check=True, stdout=subprocess.DEVNULL)
        for line in trace.read_text().splitlines():
            parts = line.split()
            if len(parts) == 5 and parts[0] == "cove-trace":
                found.setdefault(parts[2], []).append(float(parts[4]))
    return {name: statistics.median(values) for name, values in found.items()}


def show_spans(label: str, medians: dict[str, float]) -> None:
    print(f"  where {label} goes (median ms per span, COVE_TRACE_START):")
    for name, ms in medians.items():
        print(f"    {name:28s} {ms:7.2f}")


def plain_copy(source: Path, target: Path) -> float:
    """MB/s of shutil.copyfile (the kernel's copy) and an fsync of ``source``: the disk's pace in this run."""
    os.sync()  # not timed: what earlier steps left to write back would otherwise count here
    started = time.perf_counter()
    shutil.copyfile(source, target)
    fd = os.open(target, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    seconds = time.perf_counter() - started
    target.unlink()
    return source.stat().st_size / 1e6 / seconds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--big-mb", type=int, default=520, help="size of the large image's payload")
    parser.add_argument("--quoters", type=int, default=50)
    parser.add_argument("--quotes", type=int, default=40, help="quote reads per enclave")
    parser.add_argument(
        "--host-quoters",
        type=int,
        default=0,
        metavar="N",
        help="then N pid namespaces on the host reading quotes from a node server of their own, no daemon "
        "(the server's side alone: no enclave starts, supervisors or cgroups)",
    )
    parser.add_argument("--many", type=int, default=200, help="0 skips the many-enclaves part")
    parser.add_argument("--no-big", action="store_true", help="skip the large image")
    parser.add_argument(
        "--small-files", type=int, default=0, metavar="N", help="also time the first import of N files of 4 KiB"
    )
    parser.add_argument("--no-starts", action="store_true", help="skip the start-cost and cove ps figures")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (the daemon's and server's logs)")
    parser.add_argument(
        "--spans",
        type=int,
        default=0,
        metavar="N",
        help="then N traced runs of each start path: where the milliseconds go",
    )
    args = parser.parse_args()
    # as installed: every module's bytecode written (with PYTHONDONTWRITEBYTECODE set, each `cove` would
    # otherwise compile whatever changed since its .pyc was written, and the figures would count that)
    compileall.compile_dir(str(ROOT / "src" / "cove"), quiet=1)
    work = Path(tempfile.mkdtemp(prefix="cove-bench-node-"))
    sock = str(work / "d.sock")
    env = dict(
        os.environ,
        XDG_CONFIG_HOME=str(work / "config"),
        COVE_PLATFORM_DIR=str(work / "platform"),
        COVE_DAEMON_SOCKET=sock,
    )
    direct = dict(env, COVE_NO_DAEMON="1")
    daemon = None
    try:
        (work / "hello.c").write_text(HELLO)
        hello = work / "hello"
        subprocess.run(["gcc", "-O2", "-static", "-o", str(hello), str(work / "hello.c")], check=True)
        probe = work / "attest_probe"
        subprocess.run(
            ["gcc", "-O2", "-static", "-o", str(probe), str(ROOT / "tests" / "e2e" / "attest_probe.c")], check=True
        )
        small = make(work, "small", env, {"/bin": hello})
        big = None if args.no_big else make(work, "big", env, {"/bin": hello}, args.big_mb)
        quoter = make(work, "quoter", env, {"/bin": probe})
        run("add", "/bin/sh", "/bin/sleep", cwd=quoter, env=env)
        run("build", cwd=quoter, env=env)
        trace = work / "trace.txt"
        daemon_env = dict(env, COVE_TRACE_START=str(trace)) if args.spans else env  # its supervisors' spans
        daemon = subprocess.Popen(
            [COVE, "daemon", "--root", str(work / "root"), "--socket", sock],
            env=daemon_env,
            stdout=subprocess.DEVNULL,
            stderr=open(work / "daemon.log", "wb"),
        )
        while subprocess.run([COVE, "ps"], env=env, capture_output=True).returncode != 0:
            time.sleep(0.1)
        print(f"runs per figure: {args.runs} (median); {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}")

        if args.small_files:
            many_small = make(work, "manysmall", env, {"/bin": hello})
            for i in range(args.small_files):
                folder = many_small / "image" / f"d{i % 64}"
                folder.mkdir(exist_ok=True)
                (folder / f"f{i}").write_bytes(os.urandom(4096))
            run("build", cwd=many_small, env=env)
            started = time.perf_counter()
            run("-C", str(many_small), "run", "/bin/hello", env=env)  # the first run imports
            seconds = time.perf_counter() - started
            print(
                f"{args.small_files} files of 4 KiB: first cove run with the daemon (import + run) "
                f"{seconds * 1000:.0f} ms, {seconds / args.small_files * 1e6:.0f} us a file"
            )
        images = [("0.8 MB", small)] + ([(f"{size_mb(big):.0f} MB", big)] if big is not None else [])
        for label, root in images:
            if root is big:
                started = time.perf_counter()
                run("-C", str(root), "run", "/bin/hello", env=env)  # the first run imports
                seconds = time.perf_counter() - started
                copy = plain_copy(root / "image" / "payload.bin", work / "copy.bin")
                print(
                    f"{label} image: first cove run with the daemon (import + run) {seconds * 1000:.0f} ms, "
                    f"import hashing and storing at about {size_mb(big) / seconds:.0f} MB/s; a plain copy of "
                    f"its payload with fsync, this disk now: {copy:.0f} MB/s (the import at "
                    f"x{size_mb(big) / seconds / copy:.2f} of it)"
                )
            if args.no_starts:
                continue
            bwrap = timed(bare_bwrap(root / "image"), args.runs)
            via = timed([COVE, "-C", str(root), "run", "/bin/hello"], args.runs, env)
            alone = timed([COVE, "-C", str(root), "run", "/bin/hello"], args.runs, direct)
            print(
                f"{label} image: bare bwrap {bwrap:.1f} ms; cove run with the daemon {via:.1f} ms "
                f"(overhead {via - bwrap:.1f} ms, x{via / bwrap:.1f}); without it {alone:.1f} ms "
                f"(overhead {alone - bwrap:.1f} ms, x{alone / bwrap:.1f})"
            )
            if args.spans:
                show_spans(
                    f"cove run with the daemon ({label})",
                    spans([COVE, "-C", str(root), "run", "/bin/hello"], args.spans, env, trace),
                )
                show_spans(
                    f"cove run without it ({label})",
                    spans([COVE, "-C", str(root), "run", "/bin/hello"], args.spans, direct, trace),
                )
        if not args.no_starts:
            ps_ms = timed([COVE, "ps"], args.runs, env)
            thin = timed(
                [sys.executable, "-c", "from cove.daemon.client import Client; Client().call('GET', '/enclaves')"],
                args.runs,
                env,
            )
            python = timed([sys.executable, "-c", "pass"], args.runs, env)
            print(
                f"cove ps: {ps_ms:.1f} ms end to end (the thin client alone {thin:.1f} ms; "
                f"python -c pass {python:.1f} ms)"
            )

        if args.quoters:
            quotes(args, quoter, env)
        if args.many:
            many_enclaves(args, work, hello, env, daemon.pid)
        if args.host_quoters:
            host_quotes(args, work, env)
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait()
        for folder in (work / "root" / "enclaves").glob("*") if (work / "root").exists() else []:
            try:
                os.kill(json.loads((folder / "state.json").read_text())["pid"], signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass
        try:
            from cove.daemon.attestation import request

            os.kill(request(str(work / "root" / "attestation.sock"), {"op": "status"})["pid"], signal.SIGTERM)
            time.sleep(0.5)
        except (OSError, ValueError, KeyError):
            subprocess.run(["fusermount3", "-u", "-z", str(work / "root" / "attestation")], capture_output=True)
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def server_cpu(control: str) -> tuple[float, float]:
    """(CPU seconds the node's /dev/attestation server has used, seconds it waited for a CPU), over its threads,
    from the scheduler's own accounting (/proc/PID/task/*/schedstat, nanoseconds)."""
    from cove.daemon.attestation import request

    pid = request(control, {"op": "status"})["pid"]
    run = wait = 0
    for thread in os.listdir(f"/proc/{pid}/task"):
        fields = Path(f"/proc/{pid}/task/{thread}/schedstat").read_text().split()
        run, wait = run + int(fields[0]), wait + int(fields[1])
    return run / 1e9, wait / 1e9


def signature_rates(env: dict) -> tuple[float, float]:
    """Per CPU second, in this process: the raw ECDSA P-256 signature of a report, and a whole quote's evidence."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from cove.attest.evidence import REPORT_CONTEXT
    from cove.platform import monitor
    from cove.platform.reports import EnclaveClaims
    from cove.platform.state import Paths

    signer = monitor.signer(Paths(Path(env["COVE_PLATFORM_DIR"])))
    claims = EnclaveClaims(bytes(32), bytes(32), 0, 0, False, "sim", "namespaces+seccomp", "bench")
    report, _ = signer.report(claims, bytes(64))

    def rate(call) -> float:
        count, began = 0, time.process_time()
        while time.process_time() - began < 1.0:
            call()
            count += 1
        return count / (time.process_time() - began)

    return (
        rate(lambda: signer.key.sign(REPORT_CONTEXT + report, ec.ECDSA(hashes.SHA256()))),
        rate(lambda: signer.evidence(claims, bytes(64))),
    )


def read_latencies(output: str) -> list[tuple[float, float]]:
    """(latency ms, end ms on CLOCK_MONOTONIC) of each read a probe printed."""
    pairs = [line.split() for line in output.splitlines()]
    return [(int(a) / 1000, int(b) / 1000) for a, b, *_ in (p for p in pairs if len(p) == 2 and p[0].isdigit())]


def quotes(args: argparse.Namespace, quoter: Path, env: dict) -> None:
    """50 enclaves reading quotes at once: each sleeps until a common moment, then reads, and holds its output
    (and its exit) until every enclave has read, so that only quotes share the node meanwhile: an enclave's
    log and exit are work of its supervisor and the daemon, which otherwise land among the others' reads
    (docs/performance.md has both). Then the node's server's CPU per quote over that run beside the raw
    signature primitive's, measured here."""
    control = str(Path(env["COVE_DAEMON_SOCKET"]).parent / "root" / "attestation.sock")
    target = time.time() + 1.2 * args.quoters + 5
    hold = target + 5 + 0.002 * args.quoters * args.quotes  # well after the last read, at ~0.2 ms a quote
    ids = []
    for _ in range(args.quoters):
        delay = max(0.0, target - time.time())
        script = f"sleep {delay:.2f}; /bin/attest_probe bench {args.quotes} 00ff {hold:.3f}"
        ids.append(run("-C", str(quoter), "run", "-d", "/bin/sh", "-c", script, env=env).strip())
    late = time.time() - target
    time.sleep(max(0.0, target - time.time()))
    cpu_before = server_cpu(control)  # the registrations left out: the quotes alone from here
    time.sleep(max(0.0, hold - time.time()))  # no client starts among the reads
    cpu_after = server_cpu(control)
    run("wait", *ids, env=env)
    reads: list[tuple[float, float]] = []
    first_reads: list[float] = []  # each enclave's first: its lookups, in the burst at the common moment
    for ident in ids:
        mine = read_latencies(run("logs", ident, env=env))
        reads += mine
        first_reads += [latency for latency, _ in mine[:1]]
        run("rm", ident, env=env)
    latencies = [latency for latency, _ in reads]
    if late > 0:
        print(f"(the last of the {args.quoters} enclaves started {late:.1f} s after the common moment)")
    if len(latencies) != args.quoters * args.quotes:
        print(f"warning: {len(latencies)} reads of the {args.quoters * args.quotes} asked for came back")
    if max(end for _, end in reads) > min(end for _, end in reads) + (hold - target) * 1000:
        print("warning: some enclave was still reading when the others printed and left")
    print(
        f"/dev/attestation/quote with {args.quoters} enclaves reading at once: {len(latencies)} reads, "
        f"median {statistics.median(latencies):.2f} ms, p99 {percentile(latencies, 0.99):.2f} ms"
    )
    rest = sorted(latencies)
    for value in first_reads:
        rest.remove(value)
    print(
        f"  each enclave's first read: median {statistics.median(first_reads):.2f} ms, max {max(first_reads):.2f} "
        f"ms; the other reads: median {statistics.median(rest):.2f} ms, p99 {percentile(rest, 0.99):.2f} ms"
    )
    per_quote = (cpu_after[0] - cpu_before[0]) / len(latencies)
    waited = cpu_after[1] - cpu_before[1]
    raw, evidence = signature_rates(env)
    print(
        f"the node's attestation server alone: {per_quote * 1e6:.0f} us CPU per quote (with the {args.quoters} "
        f"registrations), {1 / per_quote:.0f} quotes/s of one core; it waited {waited * 1000:.0f} ms in all for "
        f"a CPU; while all {args.quoters} readers wait at once (each asks again only once answered), a read "
        f"waits for the others' quotes: {args.quoters} x {per_quote * 1e6:.0f} us = "
        f"{args.quoters * per_quote * 1000:.2f} ms with one thread serving"
    )
    print(
        f"the raw ECDSA P-256 signature {raw:.0f}/s, the whole evidence (report, signature, encoding) "
        f"{evidence:.0f}/s; the server does x{(1 / per_quote) / raw:.2f} the raw primitive's rate"
    )


def host_quotes(args: argparse.Namespace, work: Path, env: dict) -> None:
    """N pid namespaces on the host, each bound to a folder of a node server started for them, reading quotes
    at a common moment: the server and the kernel's FUSE path without a daemon, a supervisor or a sandbox."""
    from cove.daemon.attestation import request

    folder = work / "host-quotes"
    mountpoint, control, view = folder / "attestation", folder / "control.sock", folder / "view"
    view.mkdir(parents=True)
    source = (ROOT / "tests" / "e2e" / "attest_probe.c").read_text().replace("/dev/attestation", str(view))
    (folder / "probe.c").write_text(source)
    probe = folder / "probe"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(probe), str(folder / "probe.c")], check=True)
    subprocess.run(
        [sys.executable, "-m", "cove.daemon.attestation", str(mountpoint), str(control)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "server.log", "wb"),
        check=True,
    )  # it forks away
    pid = 0
    for _ in range(500):
        try:
            pid = request(str(control), {"op": "status"}, timeout=5)["pid"]
            break
        except OSError:
            time.sleep(0.02)
    identity = {
        "measurement": "11" * 32,
        "signer": "22" * 32,
        "product_id": 0,
        "svn": 0,
        "debug": False,
        "backend": "sim",
        "isolation": "namespaces+seccomp",
    }
    try:
        for i in range(args.host_quoters):
            name = f"host{i}"
            answer = request(
                str(control), {"op": "register", "instance_id": name, "identity": identity | {"instance_id": name}}
            )
            assert answer.get("ok"), answer
        target = time.time() + 1.0 + 0.05 * args.host_quoters
        readers = []
        for i in range(args.host_quoters):
            script = (
                f"mount --bind {mountpoint}/host{i} {view} && sleep {max(0.0, target - time.time()):.3f} && "
                f"exec {probe} bench {args.quotes} 00ff"
            )
            readers.append(
                subprocess.Popen(
                    ["unshare", "-mpf", "--propagation", "private", "sh", "-c", script],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        time.sleep(max(0.0, target - time.time()))
        before = server_cpu(str(control))
        outputs = [reader.communicate()[0] for reader in readers]
        after = server_cpu(str(control))
    finally:
        os.kill(pid, signal.SIGTERM)  # it unmounts and leaves
        for _ in range(250):
            if not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.02)
    latencies = sorted(latency for out in outputs for latency, _ in read_latencies(out))
    if len(latencies) != args.host_quoters * args.quotes:
        print(f"warning: {len(latencies)} reads of the {args.host_quoters * args.quotes} asked for came back")
    per_quote = (after[0] - before[0]) / len(latencies)
    print(
        f"host-side: {args.host_quoters} pid namespaces x {args.quotes} quotes, no daemon: median "
        f"{statistics.median(latencies):.2f} ms, p90 {percentile(latencies, 0.9):.2f}, p99 "
        f"{percentile(latencies, 0.99):.2f}, max {latencies[-1]:.2f} ms; the server {per_quote * 1e6:.0f} us CPU "
        f"per quote, {(after[1] - before[1]) * 1000:.0f} ms of waiting for a CPU; load {os.getloadavg()[0]:.1f}"
    )


def many_enclaves(args: argparse.Namespace, work: Path, hello: Path, env: dict, daemon_pid: int) -> None:
    """200 enclaves (a sleep each) at once: time to start them, the daemon's memory, cove ps."""
    started = time.perf_counter()
    many: list[str] = []
    sleeper = make(work, "sleeper", env, {"/bin": hello})
    run("add", "/bin/sleep", cwd=sleeper, env=env)
    run("build", cwd=sleeper, env=env)
    for _ in range(args.many):
        many.append(run("-C", str(sleeper), "run", "-d", "/bin/sleep", "3600", env=env).strip())
    start_s = time.perf_counter() - started
    views = json.loads(run("ps", "--json", env=env))
    running = sum(1 for v in views if v["state"] == "running")
    ps_many = timed([COVE, "ps"], args.runs, env)
    server = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-c",
                (
                    "import json, sys; from cove.daemon.attestation import request; "
                    "print(json.dumps(request(sys.argv[1], {'op': 'status'})))"
                ),
                str(work / "root" / "attestation.sock"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    print(
        f"{args.many} enclaves started in {start_s:.0f} s; {running} running at once; daemon RSS "
        f"{rss_mb(daemon_pid):.1f} MB; attestation server RSS {rss_mb(server['pid']):.1f} MB; "
        f"cove ps {ps_many:.1f} ms"
    )
    for ident in many:
        subprocess.run([COVE, "rm", "-f", ident], env=env, capture_output=True)


if __name__ == "__main__":
    main()
