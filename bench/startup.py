"""Startup cost of `cove run`: the C hello program natively, under bare bwrap, under Cove.

Two images: ~1 MB (a static hello) and ~80 MB (Debian's Python with its
standard library, plus the same hello). Prints median wall times over N runs,
Cove's overhead over bare bwrap in ms and as ratios, and the peak resident
memory of Cove's own process while an enclave runs. Then the same images
built with `--encrypt-image seal:mrsigner` (the root served from ciphertext
through the verifying FUSE view), and for the Python image the start of the
interpreter itself (`python3 -c pass`, some 60 files read), plain and encrypted.

    .venv/bin/python bench/startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cbor2

ROOT = Path(__file__).resolve().parents[1]
COVE = str(Path(sys.executable).parent / "cove")
HELLO = r"""#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) { if (argc > 1) sleep(1); puts("hello"); return 0; }
"""


# The same `cove run`, with the runtime's services switched off in this process
# only: it shows what verification, copying and sandboxing cost by themselves.
WITHOUT_SERVICES = (
    "import sys; import cove.runtime.enclave_services as s; s.FACTORIES.clear(); "
    "from cove.cli import main; sys.exit(main(['-C', sys.argv[1], 'run', '/bin/hello']))"
)


def timed(argv: list[str], runs: int, env: dict | None = None) -> float:
    """Median wall time of argv in milliseconds (after one warm-up run)."""
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def cove(*args: str, cwd: Path, env: dict) -> None:
    subprocess.run([COVE, *args], cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)


def make_image(work: Path, name: str, hello: Path, env: dict, python: bool) -> Path:
    cove("new", name, cwd=work, env=env)
    root = work / name
    cove("add", "--no-deps", "--to", "/bin", str(hello), cwd=root, env=env)
    if python:
        cove("add", "--bom", str(ROOT / "examples" / "python" / "cove.bom"), cwd=root, env=env)
    cove("build", cwd=root, env=env)
    return root


def image_size(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "image").rglob("*") if p.is_file() and not p.is_symlink())


def bare_bwrap(image: Path) -> list[str]:
    return [
        "bwrap",
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--ro-bind",
        str(image),
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--",
        "/bin/hello",
    ]


def peak_rss_mb(root: Path, env: dict) -> float:
    """VmHWM of the cove process while its enclave sleeps for a second."""
    proc = subprocess.Popen([COVE, "run", "/bin/hello", "sleep"], cwd=root, env=env, stdout=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.05)
    return peak / 1024


def vm_rows(work: Path, hello: Path, env: dict, runs: int, sim_ms: float) -> None:
    """The small image again with backend = "vm": boot to the program's exec, wall time, memory."""
    cove("new", "vm-small", cwd=work, env=env)
    root = work / "vm-small"
    cove("add", "--no-deps", "--to", "/bin", str(hello), cwd=root, env=env)
    cove("add", "/bin/cat", cwd=root, env=env)
    config = root / "cove.toml"
    config.write_text(config.read_text().replace('backend = "auto"', 'backend = "vm"'))
    cove("build", cwd=root, env=env)
    timings = work / "vm-timings.jsonl"
    vm_env = dict(env, COVE_VM_TIMINGS=str(timings))
    wall = timed([COVE, "-C", str(root), "run", "/bin/hello"], runs, vm_env)
    lines = [json.loads(line) for line in timings.read_text().splitlines()][1:]  # after the warm-up
    boot = statistics.median(t["boot_ms"] for t in lines)
    meminfo = subprocess.run(
        [COVE, "-C", str(root), "run", "/bin/cat", "/proc/meminfo"], env=env, check=True, capture_output=True, text=True
    ).stdout
    fields = {line.split(":")[0]: int(line.split()[1]) for line in meminfo.splitlines() if line.endswith("kB")}
    used = (fields["MemTotal"] - fields["MemAvailable"]) / 1024
    launch = cbor2.loads((root / "build" / "vm" / "launch.cbor").read_bytes())
    withheld = launch["memory"] / 2**20 - fields["MemAvailable"] / 1024
    print(
        f"{lines[0]['isolation']}, small image: QEMU start to the program's exec {boot:.0f} ms "
        f"(median), cove run {wall:.0f} ms (x{wall / sim_ms:.1f} sim's cove run)"
    )
    print(
        f"vm, small image: guest RAM {launch['memory'] / 2**20:.0f} MB, of which not available to the "
        f"program as it starts {withheld:.1f} MB (in use by kernel, init and initramfs {used:.1f} MB, "
        f"MemTotal - MemAvailable); QEMU peak RSS {qemu_peak_rss_mb(root, env):.1f} MB"
    )
    shared_rows(root, env, runs, boot, wall)
    encrypted_vm_rows(root, env, runs, boot, wall, used)


def shared_rows(root: Path, env: dict, runs: int, boot: float, wall: float) -> None:
    """The same vm image with one encrypted mount: what virtiofsd, the shared memfd and the guest's
    virtiofs module add to the boot (and the FUSE server to the whole run), against the row above."""
    config = root / "cove.toml"
    plain = config.read_text()
    config.write_text(plain + '\n[[mounts]]\ntarget = "/data"\ntype = "encrypted"\nkey = "seal:mrsigner"\n')
    try:
        cove("build", cwd=root, env=env)
        timings = root.parent / "vm-shared-timings.jsonl"
        shared_wall = timed([COVE, "-C", str(root), "run", "/bin/hello"], runs, dict(env, COVE_VM_TIMINGS=str(timings)))
        lines = [json.loads(line) for line in timings.read_text().splitlines()][1:]
        shared_boot = statistics.median(t["boot_ms"] for t in lines)
        print(
            f"vm, small image with an encrypted mount (virtio-fs): QEMU start to the program's exec "
            f"{shared_boot:.0f} ms (+{shared_boot - boot:.0f} ms, x{shared_boot / boot:.2f} without), "
            f"cove run {shared_wall:.0f} ms (+{shared_wall - wall:.0f} ms, x{shared_wall / wall:.2f})"
        )
    finally:
        config.write_text(plain)


def encrypted_vm_rows(root: Path, env: dict, runs: int, boot: float, wall: float, used: float) -> None:
    """The same vm image built with --encrypt-image: no image in the initramfs, the root the host's
    verifying FUSE view over virtio-fs (virtiofsd, the shared memfd, the guest's virtiofs module, the
    FUSE server's start), against the plain vm rows above."""
    cove("build", "--encrypt-image", "seal:mrsigner", cwd=root, env=env)
    try:
        timings = root.parent / "vm-encrypted-timings.jsonl"
        enc_wall = timed([COVE, "-C", str(root), "run", "/bin/hello"], runs, dict(env, COVE_VM_TIMINGS=str(timings)))
        lines = [json.loads(line) for line in timings.read_text().splitlines()][1:]
        enc_boot = statistics.median(t["boot_ms"] for t in lines)
        meminfo = subprocess.run(
            [COVE, "-C", str(root), "run", "/bin/cat", "/proc/meminfo"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        fields = {line.split(":")[0]: int(line.split()[1]) for line in meminfo.splitlines() if line.endswith("kB")}
        enc_used = (fields["MemTotal"] - fields["MemAvailable"]) / 1024
        print(
            f"vm, small image built with --encrypt-image (root over virtio-fs): QEMU start to the program's "
            f"exec {enc_boot:.0f} ms (+{enc_boot - boot:.0f} ms, x{enc_boot / boot:.2f} the plain vm image), "
            f"cove run {enc_wall:.0f} ms (+{enc_wall - wall:.0f} ms, x{enc_wall / wall:.2f}); in use in the "
            f"guest at the program's start {enc_used:.1f} MB ({enc_used - used:+.1f} MB)"
        )
    finally:
        cove("build", cwd=root, env=env)


def qemu_peak_rss_mb(root: Path, env: dict) -> float:
    """VmHWM of the QEMU process while its guest's program sleeps for a second."""
    proc = subprocess.Popen([COVE, "run", "/bin/hello", "sleep"], cwd=root, env=env, stdout=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and b"qemu-system" in (entry / "cmdline").read_bytes():
                    for line in (entry / "status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            peak = max(peak, int(line.split()[1]))
            except OSError:
                pass
        time.sleep(0.1)
    return peak / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--vm-runs", type=int, default=5, help="runs per vm figure (each boots a VM)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cove-bench-"))
    env = dict(
        os.environ, XDG_CONFIG_HOME=str(work / "config"), COVE_PLATFORM_DIR=str(work / "platform"), COVE_NO_DAEMON="1"
    )  # direct mode even if a cove daemon runs (bench/node.py measures that)
    try:
        (work / "hello.c").write_text(HELLO)
        hello = work / "hello"
        subprocess.run(["gcc", "-O2", "-static", "-o", str(hello), str(work / "hello.c")], check=True)
        native = timed([str(hello)], args.runs)
        print(f"runs per figure: {args.runs} (median)")
        print(f"native hello: {native:.1f} ms")
        for label, python in (("small", False), ("python", True)):
            root = make_image(work, label, hello, env, python)
            size = image_size(root) / 1e6
            bwrap = timed(bare_bwrap(root / "image"), args.runs)
            cove_ms = timed([COVE, "-C", str(root), "run", "/bin/hello"], args.runs, env)
            bare_ms = timed([sys.executable, "-c", WITHOUT_SERVICES, str(root)], args.runs, env)
            print(
                f"{label} image ({size:.1f} MB): bare bwrap {bwrap:.1f} ms, cove run {cove_ms:.1f} ms, "
                f"overhead over bwrap {cove_ms - bwrap:.1f} ms "
                f"(x{cove_ms / bwrap:.2f} bwrap, x{cove_ms / native:.1f} native)"
            )
            print(
                f"{label} image: runtime alone (no /dev/attestation server) {bare_ms:.1f} ms, "
                f"overhead over bwrap {bare_ms - bwrap:.1f} ms; the attestation server adds "
                f"{cove_ms - bare_ms:.1f} ms"
            )
            print(f"{label} image: peak RSS of the cove process {peak_rss_mb(root, env):.1f} MB")
            if not python and args.vm_runs:
                vm_rows(work, hello, env, args.vm_runs, cove_ms)
            interpreter = [COVE, "-C", str(root), "run", "/usr/bin/python3.11", "-c", "pass"]
            plain_py = timed(interpreter, args.runs, env) if python else 0.0
            cove("build", "--encrypt-image", "seal:mrsigner", cwd=root, env=env)
            encrypted_ms = timed([COVE, "-C", str(root), "run", "/bin/hello"], args.runs, env)
            print(
                f"{label} image, encrypted: cove run {encrypted_ms:.1f} ms "
                f"(+{encrypted_ms - cove_ms:.1f} ms, x{encrypted_ms / cove_ms:.2f} the plain image)"
            )
            if python:
                encrypted_py = timed(interpreter, args.runs, env)
                print(
                    f"{label} image: python3 -c pass in the enclave {plain_py:.1f} ms plain, "
                    f"{encrypted_py:.1f} ms encrypted (x{encrypted_py / plain_py:.2f})"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
