"""Start cost of a Cove image under real engines: `cove-runtime` against `runc`, measured in the same run.

Builds a small image (a static C hello, packaged with `cove package --oci`),
loads it into Podman and into a private containerd, then times
`podman run --rm IMAGE /hello` and `ctr run --rm IMAGE ID /hello` with
`--runtime`/`--runc-binary` set to cove-runtime and to runc, interleaved.
Prints medians, Cove's overhead in ms and the ratio (this machine kind:
cgroups v1 hybrid, so Podman runs with --cgroup-manager=cgroupfs and
1024:1024 nofile/nproc ulimits).

    .venv/bin/python bench/oci.py [--runs 10]
"""

from __future__ import annotations

import argparse
import os
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
PODMAN = ["podman", "--cgroup-manager=cgroupfs"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def run(argv: list[str], **kwargs) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kwargs)


def build_image(work: Path, env: dict) -> Path:
    run([COVE, "new", "hello"], cwd=work, env=env)
    app = work / "hello"
    run(["gcc", "-static", "-O2", "-x", "c", "-o", str(app / "image" / "hello"), "-"], input=HELLO.encode())
    toml = (app / "cove.toml").read_text().replace('entry_points = ["/bin/", "/usr/bin/"]',
                                                     'entry_points = ["/hello"]')
    (app / "cove.toml").write_text(toml)
    run([COVE, "build"], cwd=app, env=env)
    run([COVE, "package", "--oci", "--tag", IMAGE, "-o", str(work / "hello.tar")], cwd=app, env=env)
    return work / "hello.tar"


def median_ms(commands: dict, runs: int) -> dict[str, float]:
    """Median wall time of each command (an argv, or a function making one), interleaved, one warm-up each."""
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for name, argv in commands.items():
        run(argv() if callable(argv) else argv)
    for _ in range(runs):
        for name, argv in commands.items():
            argv = argv() if callable(argv) else argv
            start = time.perf_counter()
            run(argv)
            samples[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def report(title: str, figures: dict[str, float]) -> None:
    base, cove = figures["runc"], figures["cove-runtime"]
    print(f"{title}: runc {base:.0f} ms, cove-runtime {cove:.0f} ms, "
          f"overhead {cove - base:.0f} ms, ratio {cove / base:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    runc = shutil.which("runc") or "/usr/sbin/runc"
    work = Path(tempfile.mkdtemp(prefix="cove-bench-oci-"))
    env = dict(os.environ, HOME=str(work), XDG_CONFIG_HOME=str(work))
    containerd = None
    try:
        tar = build_image(work, env)
        run([*PODMAN, "load", "-i", str(tar)])
        podman = {name: [*PODMAN, "run", "--rm", "--runtime", binary, *ULIMITS, IMAGE, "/hello"]
                  for name, binary in (("runc", runc), ("cove-runtime", RUNTIME))}
        report("podman run --rm", median_ms(podman, args.runs))
        sock = work / "containerd.sock"
        log = open(work / "containerd.log", "w")
        containerd = subprocess.Popen(["containerd", "--root", str(work / "ctd-root"), "--state",
                                       str(work / "ctd-state"), "--address", str(sock)],
                                      stdout=log, stderr=subprocess.STDOUT)
        ctr = ["ctr", "-a", str(sock)]
        for _ in range(200):
            if sock.exists() and subprocess.run([*ctr, "version"], capture_output=True).returncode == 0:
                break
            time.sleep(0.05)
        run([*ctr, "images", "import", str(tar)])
        counter = iter(range(10 ** 6))

        def ctr_run(binary: str):  # a fresh container id per run
            return lambda: [*ctr, "run", "--rm", "--runc-binary", binary, IMAGE, f"bench-{next(counter)}", "/hello"]

        ctr_commands = {"runc": ctr_run(runc), "cove-runtime": ctr_run(RUNTIME)}
        report("ctr run --rm", median_ms(ctr_commands, args.runs))
    finally:
        subprocess.run([*PODMAN, "rmi", "-f", IMAGE], capture_output=True)
        if containerd is not None:
            containerd.terminate()
            containerd.wait(timeout=30)
            subprocess.run(["umount", "-R", "-l", str(work / "ctd-state")], capture_output=True)
            subprocess.run(["umount", "-R", "-l", str(work / "ctd-root")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
