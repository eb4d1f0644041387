"""Where a `vm` enclave's boot goes: QEMU's CPU time and wall time to Cove's init, per kernel form.

Boots the launch inputs of a small vm build with the init's probe request (it
answers and powers off; no program runs) under TCG, alternating the variants
run by run so that the machine's load weighs on each alike, and prints the
medians and each variant's ratio to the built kernel measured in the same
run. CPU time (user + system of the QEMU process when the init answers) is
what the guest's boot costs; wall time above it is the host's load.

Variants: `built` (the kernel of the build: what Cove boots), the other form
of the same kernel (`bzimage`, Debian's compressed file, which the guest
decompresses after a real-mode setup, or `pvh`, its ELF entered through the
PVH note), and `built+ARGS` for `--append ARGS`.

    .venv/bin/python bench/vm_boot.py [--runs 7] [--append "nokaslr"] [--instance DIR]
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cbor2

from cove.image import vmimage
from cove.runtime import vm

COVE = str(Path(sys.executable).parent / "cove")


def build_instance(work: Path) -> Path:
    env = dict(os.environ, XDG_CONFIG_HOME=str(work / "config"))
    subprocess.run([COVE, "new", "vm-boot"], cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)
    root = work / "vm-boot"
    subprocess.run([COVE, "add", "/bin/cat"], cwd=root, env=env, check=True, stdout=subprocess.DEVNULL)
    config = root / "cove.toml"
    config.write_text(config.read_text().replace('backend = "auto"', 'backend = "vm"'))
    subprocess.run([COVE, "build"], cwd=root, env=env, check=True, stdout=subprocess.DEVNULL)
    return root


def other_form(built: Path, work: Path) -> tuple[str, Path] | None:
    """The same kernel in its other form: the package's bzImage for a PVH build, or the reverse."""
    data = built.read_bytes()
    if data.startswith(b"\x7fELF"):
        return "bzimage", vmimage.find_kernel(None)
    unpacked = vmimage.boot_kernel(data)
    if unpacked == data:
        return None
    (work / "vmlinux").write_bytes(unpacked)
    return "pvh", work / "vmlinux"


def boot(description: dict[str, object], kernel: Path, initrd: Path, folder: Path) -> tuple[float, float]:
    """(wall s, QEMU CPU s) from QEMU's start to the init's answer to a probe request."""
    pairs = [socket.socketpair() for _ in vmimage.PORTS]
    guest_fds = [pair[1].fileno() for pair in pairs]
    args = vm.qemu_arguments(description, kernel, initrd, "tcg", folder / "console.log", guest_fds)
    started = time.monotonic()
    process = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=guest_fds
    )
    for pair in pairs:
        pair[1].close()
    ctl = pairs[vmimage.PORTS.index("cove.ctl")][0]
    try:
        ctl.sendall(struct.pack("<I", 2) + b"Q\0")
        answer = b""
        while time.monotonic() - started < 120:
            if select.select([ctl], [], [], 0.05)[0]:
                chunk = ctl.recv(256)
                if not chunk:
                    break
                answer += chunk
                if b"X0\n" in answer:
                    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
                    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                    return time.monotonic() - started, cpu
        raise SystemExit(f"the guest did not answer (console: {folder / 'console.log'})")
    finally:
        process.kill()
        process.wait()
        for pair in pairs:
            pair[0].close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--append", default="", help="kernel arguments for a third variant")
    parser.add_argument("--instance", type=Path, help="a built vm instance (default: a new one with /bin/cat)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cove-vm-boot-") as tmp:
        work = Path(tmp)
        root = args.instance or build_instance(work)
        folder = root / "build" / vmimage.FOLDER
        description = cbor2.loads((folder / vmimage.LAUNCH).read_bytes())
        kernel, initrd = folder / vmimage.KERNEL, folder / vmimage.INITRD
        variants: dict[str, tuple[dict[str, object], Path]] = {"built": (description, kernel)}
        other = other_form(kernel, work)
        if other is not None:
            variants[other[0]] = (description, other[1])
        if args.append:
            variants[f"built+{args.append}"] = (
                {**description, "cmdline": f"{description['cmdline']} {args.append}"},
                kernel,
            )
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for _ in range(args.runs):
            for name, (desc, image) in variants.items():
                samples[name].append(boot(desc, image, initrd, work))
        base_wall = statistics.median(s[0] for s in samples["built"])
        base_cpu = statistics.median(s[1] for s in samples["built"])
        for name, values in samples.items():
            wall = statistics.median(s[0] for s in values)
            cpu = statistics.median(s[1] for s in values)
            print(
                f"{name}: QEMU start to the init's answer {wall * 1000:.0f} ms wall (x{wall / base_wall:.2f} built), "
                f"{cpu * 1000:.0f} ms QEMU CPU (x{cpu / base_cpu:.2f} built), median of {args.runs}"
            )
        print(f"load average {os.getloadavg()[0]:.1f} (wall above CPU time is the host's load)")


if __name__ == "__main__":
    main()
