"""Start cost of a Cove image under real engines: `cove-runtime` against `runc`, measured in the same run.

Builds a small image (a static C hello, packaged with `cove package --oci`),
loads it into Podman and into a private containerd, then times
`podman run --rm IMAGE /hello` and `ctr run --rm IMAGE ID /hello` with
`--runtime`/`--runc-binary` set to cove-runtime and to runc, interleaved.
By default a private node service (`cove daemon`) runs, so containers get
/dev/attestation from its one server (--no-node-service: a server per container).
Prints medians, Cove's overhead in ms and the ratio (this machine kind:
cgroups v1 hybrid, so Podman runs with --cgroup-manager=cgroupfs and
1024:1024 nofile/nproc ulimits). --spans also prints where cove-runtime's
time goes in the `ctr run` calls (containerd hands its environment to the
runtime, so COVE_TRACE_START reaches it; Podman's conmon does not): the
median of each span of create, the container's process and the launch.
--calls runs each runtime through a small shell wrapper that logs every
call the engine makes (argv, start, end, exit code) and prints, per engine
and runtime, the calls of one run and the median time of each (the
wrapper's own `date` calls add a few ms to both runtimes' figures alike).
cove-runtime runs with its resident `create` (cove.oci.resident): the
machine's helper is started with `cove-runtime resident` before the runs (it
stays, and leaves after ten idle minutes). --in-process adds a runtime that
is cove-runtime with the resident path switched off (COVE_RUNTIME_RESIDENT=0,
set by a small script, as conmon does not hand its environment on): the
path every `create` took before, measured in the same run.
--resident-prototype adds a third runtime, bench/oci_resident_prototype.py
(a warm process does `create`'s work; a measuring prototype of the design in
docs/containers.md, "A resident create"), to both engines' runs, and first
measures `create` alone with both paths, interleaved: the CPU of create's
own process (and, resident, of the warm process's worker up to its answer)
and of the container's process before `start` (/proc/PID/schedstat).

    .venv/bin/python bench/oci.py [--runs 10] [--no-node-service] [--spans] [--calls] [--in-process]
                                  [--resident-prototype]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COVE = str(Path(sys.executable).parent / "cove")
RUNTIME = str(Path(sys.executable).parent / "cove-runtime")
HELLO = '#include <stdio.h>\nint main(void) { puts("hello"); return 0; }\n'
IMAGE = "localhost/cove-bench/hello:1"
PROTOTYPE = Path(__file__).resolve().parent / "oci_resident_prototype.py"
PODMAN = ["podman", "--cgroup-manager=cgroupfs"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def run(argv: list[str], **kwargs) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kwargs)


def build_image(work: Path, env: dict) -> Path:
    run([COVE, "new", "hello"], cwd=work, env=env)
    app = work / "hello"
    run(["gcc", "-static", "-O2", "-x", "c", "-o", str(app / "image" / "hello"), "-"], input=HELLO.encode())
    toml = (app / "cove.toml").read_text().replace('entry_points = ["/bin/", "/usr/bin/"]', 'entry_points = ["/hello"]')
    (app / "cove.toml").write_text(toml)
    run([COVE, "build"], cwd=app, env=env)
    run([COVE, "package", "--oci", "--tag", IMAGE, "-o", str(work / "hello.tar")], cwd=app, env=env)
    return work / "hello.tar"


def median_ms(commands: dict, runs: int) -> dict[str, float]:
    """Median wall time of each command (an argv, or a function making one), interleaved, one warm-up each."""
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for argv in commands.values():
        run(argv() if callable(argv) else argv)
    for _ in range(runs):
        for name, argv in commands.items():
            argv = argv() if callable(argv) else argv
            start = time.perf_counter()
            run(argv)
            samples[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def report(title: str, figures: dict[str, float]) -> None:
    base = figures["runc"]
    for name, cove in figures.items():
        if name != "runc":
            print(
                f"{title}: runc {base:.0f} ms, {name} {cove:.0f} ms, "
                f"overhead {cove - base:.0f} ms, ratio {cove / base:.2f}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument(
        "--no-node-service",
        dest="node_service",
        action="store_false",
        help="without the node service: each container starts its own /dev/attestation server",
    )
    parser.add_argument(
        "--spans",
        action="store_true",
        help="print the median of each cove-runtime span (COVE_TRACE_START) of the ctr runs",
    )
    parser.add_argument(
        "--calls",
        action="store_true",
        help="log every runtime call the engines make and print the median time of each kind",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="also run cove-runtime without its resident create (the in-process path), in the same run",
    )
    parser.add_argument(
        "--resident-prototype",
        action="store_true",
        help="also run bench/oci_resident_prototype.py (create's work in a warm process) and measure create's CPU",
    )
    args = parser.parse_args()
    runc = shutil.which("runc") or "/usr/sbin/runc"
    work = Path(tempfile.mkdtemp(prefix="cove-bench-oci-"))
    runtimes = {"runc": runc, "cove-runtime": RUNTIME}
    if args.in_process:
        runtimes["in-process"] = in_process_runtime(work)
    if args.resident_prototype:
        runtimes["resident"] = prototype_runtime(work)
    binaries = dict(runtimes)
    if args.calls:
        runtimes = {name: wrapper(work, name, binary) for name, binary in runtimes.items()}
    env = dict(os.environ, HOME=str(work), XDG_CONFIG_HOME=str(work))
    containerd = None
    node = None
    warm = None
    try:
        tar = build_image(work, env)
        if args.node_service:  # /dev/attestation from the node's one server, not a server per container
            (work / "node").mkdir(mode=0o700)
            node = subprocess.Popen(
                [COVE, "daemon", "--root", str(work / "node"), "--socket", str(work / "d.sock")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(600):
                if (work / "node" / "attestation.sock").exists():
                    break
                time.sleep(0.05)
            os.environ["COVE_NODE_ROOT"] = str(work / "node")  # containerd hands its environment to the runtime
        # the machine's helper (a no-op when one answers already), leaving after ten idle minutes
        run([RUNTIME, "resident"], env=dict(os.environ, COVE_RUNTIME_RESIDENT_IDLE="600"))
        if args.resident_prototype:  # after the node service: it inherits COVE_NODE_ROOT
            warm = subprocess.Popen([sys.executable, str(PROTOTYPE), "serve", str(work / "proto.sock")])
            for _ in range(600):
                if (work / "proto.sock").exists():
                    break
                time.sleep(0.05)
            create_cpu(work, tar, binaries, args.runs * 2)
        run([*PODMAN, "load", "-i", str(tar)])
        node_flag = ["--runtime-flag", f"node-root={work / 'node'}"] if node is not None else []
        podman = {
            name: [*PODMAN, "run", "--rm", "--runtime", binary, *(node_flag if name != "runc" else []), *ULIMITS]
            + [IMAGE, "/hello"]
            for name, binary in runtimes.items()
        }
        report("podman run --rm", median_ms(podman, args.runs))
        if args.calls:
            print_calls("podman run --rm", work, args.runs + 1)
        sock = work / "containerd.sock"
        if args.spans:  # containerd's shims hand this to cove-runtime
            os.environ["COVE_TRACE_START"] = str(work / "spans.txt")
        log = open(work / "containerd.log", "w")
        containerd = subprocess.Popen(
            [
                "containerd",
                "--root",
                str(work / "ctd-root"),
                "--state",
                str(work / "ctd-state"),
                "--address",
                str(sock),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        ctr = ["ctr", "-a", str(sock)]
        for _ in range(200):
            if sock.exists() and subprocess.run([*ctr, "version"], capture_output=True).returncode == 0:
                break
            time.sleep(0.05)
        run([*ctr, "images", "import", str(tar)])
        counter = iter(range(10**6))

        def ctr_run(binary: str):  # a fresh container id per run
            return lambda: [*ctr, "run", "--rm", "--runc-binary", binary, IMAGE, f"bench-{next(counter)}", "/hello"]

        ctr_commands = {name: ctr_run(binary) for name, binary in runtimes.items()}
        report("ctr run --rm", median_ms(ctr_commands, args.runs))
        if args.calls:
            print_calls("ctr run --rm", work, args.runs + 1)
        if args.spans:
            print_spans(work / "spans.txt")
    finally:
        subprocess.run([*PODMAN, "rmi", "-f", IMAGE], capture_output=True)
        if warm is not None:
            warm.terminate()
            warm.wait(timeout=30)
        if node is not None:
            node.terminate()
            node.wait(timeout=30)
            _stop_node_attestation(work / "node")
        if containerd is not None:
            containerd.terminate()
            containerd.wait(timeout=30)
            subprocess.run(["umount", "-R", "-l", str(work / "ctd-state")], capture_output=True)
            subprocess.run(["umount", "-R", "-l", str(work / "ctd-root")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


COMMANDS = ("create", "start", "state", "kill", "delete", "exec", "features")


def wrapper(work: Path, name: str, binary: str) -> str:
    """A shell script that runs binary and appends `START_NS END_NS CODE ARGV...` to work/calls-NAME.log."""
    script = work / f"logged-{name}"
    log = work / f"calls-{name}.log"
    script.write_text(
        f'#!/bin/sh\ns=$(date +%s%N)\n"{binary}" "$@"\nc=$?\necho "$s $(date +%s%N) $c $*" >> "{log}"\nexit $c\n'
    )
    script.chmod(0o755)
    return str(script)


def print_calls(title: str, work: Path, runs: int) -> None:
    """Per runtime: the calls one run makes (count per run) and the median ms of each kind; the log restarts."""
    print(f"{title}: runtime calls per run (count, median ms, failed)")
    for name in ("runc", "cove-runtime", "in-process", "resident"):
        log = work / f"calls-{name}.log"
        durations: dict[str, list[float]] = {}
        failed: dict[str, int] = {}
        try:
            lines = log.read_text().splitlines()
            log.unlink()
        except OSError:
            continue  # a runtime this run did not measure
        for line in lines:
            start, end, code, *argv = line.split()
            kind = next((word for word in argv if word in COMMANDS), "?")
            durations.setdefault(kind, []).append((int(end) - int(start)) / 1e6)
            failed[kind] = failed.get(kind, 0) + (code != "0")
        summary = ", ".join(
            f"{kind} {len(values) / runs:.1f}x {statistics.median(values):.1f} ms"
            + (f" ({failed[kind]} failed)" if failed[kind] else "")
            for kind, values in durations.items()
        )
        print(f"  {name:13} {summary}")


def print_spans(path: Path) -> None:
    """The median duration of each span name, in the order spans first appear (cove.trace's lines)."""
    durations: dict[str, list[float]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        print("no spans were written (is COVE_TRACE_START reaching cove-runtime?)")
        return
    for line in lines:
        fields = line.split()
        if len(fields) == 5 and fields[0] == "cove-trace":
            durations.setdefault(fields[2], []).append(float(fields[4]))
    print("cove-runtime spans in the ctr runs (median ms, count):")
    for name, values in durations.items():
        print(f"  {name:34} {statistics.median(values):8.1f} {len(values):4d}")


def in_process_runtime(work: Path) -> str:
    """cove-runtime with its resident create switched off, as a runtime binary for the engines."""
    script = work / "in-process-runtime"
    script.write_text(f'#!/bin/sh\nCOVE_RUNTIME_RESIDENT=0 exec "{RUNTIME}" "$@"\n')
    script.chmod(0o755)
    return str(script)


def prototype_runtime(work: Path) -> str:
    """The prototype as a runtime script for the engines: the venv's Python, this run's warm process's socket.

    Podman's conmon does not hand its environment to the runtime, so the
    socket is written into the script.
    """
    script = work / "resident-runtime"
    source = PROTOTYPE.read_text().replace('"/run/cove-proto.sock"', repr(str(work / "proto.sock")), 1)
    script.write_text(f"#!{sys.executable}\n{source}")
    script.chmod(0o755)
    return str(script)


def _bundle(work: Path, tar: Path) -> Path:
    """A bundle of the hello image as an engine makes one: config.json and the layer unpacked."""
    import tarfile

    unpacked = work / "unpacked"
    with tarfile.open(tar) as archive:
        archive.extractall(unpacked, filter="data")
    layer = unpacked / json.loads((unpacked / "manifest.json").read_text())[0]["Layers"][0]
    bundle = work / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    with tarfile.open(layer) as archive:
        archive.extractall(bundle / "rootfs", filter="tar")
    spec = {
        "ociVersion": "1.0.2",
        "process": {"args": ["/hello"], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]},
    }
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def _cpu_ns(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/schedstat") as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def create_cpu(work: Path, tar: Path, runtimes: dict[str, str], runs: int) -> None:
    """`create` alone, today's path and the prototype's, interleaved: CPU per create (ms, medians) and wall time.

    own: create's process (getrusage of the children); worker: the warm
    process's worker up to its answer; container: the container's process
    before `start` (schedstat, read 0.5 s after create, once it waits).
    """
    bundle, root, log = _bundle(work, tar), work / "cpu-root", work / "worker-cpu.log"
    figures: dict[str, dict[str, list[float]]] = {}
    for round_ in range(runs + 1):
        for name in ("cove-runtime", "resident"):
            ident = f"cpu-{round_}-{name}"
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(
                [runtimes[name], "--root", str(root), "create", "--bundle", str(bundle), ident],
                check=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=dict(os.environ, COVE_PROTO_CPU=str(log)),
            )
            wall = (time.perf_counter() - start) * 1000
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            time.sleep(0.5)
            state = json.loads(
                subprocess.run([RUNTIME, "--root", str(root), "state", ident], capture_output=True).stdout
            )
            worker = 0.0
            if name == "resident":
                worker = float(log.read_text().splitlines()[-1].split()[0])
                inner = int(log.read_text().splitlines()[-1].split()[1])
                container = _cpu_ns(inner) + _cpu_ns(state["pid"])
            else:
                container = _cpu_ns(state["pid"])
            run([RUNTIME, "--root", str(root), "delete", "--force", ident])
            if round_:  # the first round warms the page cache
                own = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000
                sample = {"own": own, "worker": worker, "container": container / 1e6, "wall": wall}
                for key, value in sample.items():
                    figures.setdefault(name, {}).setdefault(key, []).append(value)
    print(f"create alone, medians of {runs} (CPU ms: create's own process + worker, container's process before start)")
    for name, values in figures.items():
        medians = {key: statistics.median(samples) for key, samples in values.items()}
        print(
            f"  {name:13} own {medians['own']:.1f} + worker {medians['worker']:.1f} + container "
            f"{medians['container']:.1f} = {medians['own'] + medians['worker'] + medians['container']:.1f} ms of CPU; "
            f"wall {medians['wall']:.0f} ms"
        )


def _stop_node_attestation(root: Path) -> None:
    """The node's attestation server outlives the daemon by design; this run's own is stopped here."""
    from cove.daemon import attestation

    try:
        pid = attestation.request(str(root / "attestation.sock"), {"op": "status"}, timeout=5)["pid"]
        os.kill(pid, 15)
    except (OSError, ValueError, KeyError):
        pass


if __name__ == "__main__":
    sys.exit(main())
