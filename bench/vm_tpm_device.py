"""What `[vm] tpm_device` costs: boot time to the program and guest memory, against the same build without it.

Builds one small vm instance twice (with and without the guest's TPM device),
runs `cove run` on each in turn under TCG so the machine's load weighs on
both alike, and prints the medians of QEMU's start to the program's exec
(COVE_VM_TIMINGS; with the device this includes waiting for the vTPM's
provisioning, which QEMU's start needs) and of `cove run` as a whole, with
the ratio to the build without the device measured in the same run. With
`--memory`, one more run of each prints MemAvailable when the program runs:
the difference is what the device costs the program.

    .venv/bin/python bench/vm_tpm_device.py [--runs 5] [--memory]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COVE = str(Path(sys.executable).parent / "cove")


def build(work: Path, name: str, device: bool, env: dict[str, str]) -> Path:
    subprocess.run([COVE, "new", name], cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)
    root = work / name
    subprocess.run([COVE, "add", "/bin/cat", "/bin/true"], cwd=root, env=env, check=True, stdout=subprocess.DEVNULL)
    config = root / "cove.toml"
    text = config.read_text().replace('backend = "auto"', 'backend = "vm"')
    config.write_text(text + ("\n[vm]\ntpm_device = true\n" if device else ""))
    subprocess.run([COVE, "build"], cwd=root, env=env, check=True, stdout=subprocess.DEVNULL)
    return root


def run(root: Path, env: dict[str, str], timings: Path, *argv: str) -> tuple[float, float, str]:
    """(seconds of `cove run`, seconds from QEMU's start to the program's exec, the program's output)."""
    timings.unlink(missing_ok=True)
    started = time.monotonic()
    done = subprocess.run(
        [COVE, "run", *argv], cwd=root, env=dict(env, COVE_VM_TIMINGS=str(timings)), capture_output=True, text=True
    )
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"cove run failed: {done.stderr.strip()}")
    boot = json.loads(timings.read_text().splitlines()[-1])["boot_ms"] / 1000
    return wall, boot, done.stdout


def available_kib(meminfo: str) -> int:
    return next(int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemAvailable:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--memory", action="store_true", help="one more run of each: MemAvailable")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = dict(os.environ, XDG_CONFIG_HOME=str(work / "config"), COVE_VM_ACCEL="tcg")
        roots = {"without": build(work, "plain", False, env), "tpm_device": build(work, "tpm", True, env)}
        walls: dict[str, list[float]] = {k: [] for k in roots}
        boots: dict[str, list[float]] = {k: [] for k in roots}
        for _ in range(args.runs):
            for name, root in roots.items():
                wall, boot, _ = run(root, env, work / "timings", "/bin/true")
                walls[name].append(wall)
                boots[name].append(boot)
        base_wall, base_boot = statistics.median(walls["without"]), statistics.median(boots["without"])
        print(f"runs: {args.runs} each, alternated; TCG; load average {os.getloadavg()[0]:.2f}")
        for name in roots:
            wall, boot = statistics.median(walls[name]), statistics.median(boots[name])
            print(
                f"{name:>10}: QEMU start to exec {boot:.3f} s (x{boot / base_boot:.2f}), "
                f"cove run {wall:.3f} s (x{wall / base_wall:.2f})"
            )
        if args.memory:
            kib = {
                name: available_kib(run(root, env, work / "timings", "/bin/cat", "/proc/meminfo")[2])
                for name, root in roots.items()
            }
            print(
                f"MemAvailable when the program runs: without {kib['without'] / 1024:.1f} MB, "
                f"with the device {kib['tpm_device'] / 1024:.1f} MB "
                f"(the device costs {(kib['without'] - kib['tpm_device']) / 1024:.1f} MB)"
            )


if __name__ == "__main__":
    main()
