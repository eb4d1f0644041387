"""Where a `vm` enclave's boot goes: QEMU's CPU time and wall time to Cove's init, per kernel form.

Boots the launch inputs of a small vm build with the init's probe request (it
answers and powers off; no program runs) under TCG, alternating the variants
run by run so that the machine's load weighs on each alike, and prints the
medians and each variant's ratio to the stock kernel measured in the same
run. CPU time (user + system of the QEMU process when the init answers) is
what the guest's boot costs; wall time above it is the host's load.

Variants: `stock` (Debian's compressed bzImage, what Cove boots), `pvh` (the
same kernel decompressed to its ELF image and entered through its PVH note:
no decompression, no real-mode setup), and `stock+ARGS` for `--append ARGS`.

    .venv/bin/python bench/vm_boot.py [--runs 7] [--append "nokaslr"] [--instance DIR]
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
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
LZ4_LEGACY = b"\x02\x21\x4c\x18"


def build_instance(work: Path) -> Path:
    env = dict(os.environ, XDG_CONFIG_HOME=str(work / "config"))
    subprocess.run([COVE, "new", "vm-boot"], cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)
    root = work / "vm-boot"
    subprocess.run([COVE, "add", "/bin/cat"], cwd=root, env=env, check=True, stdout=subprocess.DEVNULL)
    config = root / "cove.toml"
    config.write_text(config.read_text().replace('backend = "auto"', 'backend = "vm"'))
    subprocess.run([COVE, "build"], cwd=root, env=env, check=True, stdout=subprocess.DEVNULL)
    return root


def pvh_kernel(bzimage: Path, dest: Path) -> Path | None:
    """The ELF kernel inside an LZ4-compressed bzImage (Debian's cloud kernel), if lz4 is installed."""
    data = bzimage.read_bytes()
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)  # payload_offset, payload_length
    payload = data[(setup_sects + 1) * 512 + offset:][:length]
    lz4 = shutil.which("lz4")
    if not payload.startswith(LZ4_LEGACY) or lz4 is None:
        return None
    out = subprocess.run([lz4, "-dc"], input=payload, capture_output=True)  # it warns about the size trailer
    if not out.stdout.startswith(b"\x7fELF"):
        return None
    dest.write_bytes(out.stdout)
    return dest


def boot(description: dict[str, object], kernel: Path, initrd: Path, folder: Path) -> tuple[float, float]:
    """(wall s, QEMU CPU s) from QEMU's start to the init's answer to a probe request."""
    pairs = [socket.socketpair() for _ in vmimage.PORTS]
    guest_fds = [pair[1].fileno() for pair in pairs]
    args = vm.qemu_arguments(description, kernel, initrd, "tcg", folder / "console.log", guest_fds)
    started = time.monotonic()
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, pass_fds=guest_fds)
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
        variants: dict[str, tuple[dict[str, object], Path]] = {"stock": (description, kernel)}
        pvh = pvh_kernel(kernel, work / "vmlinux")
        if pvh is not None:
            variants["pvh"] = (description, pvh)
        if args.append:
            variants[f"stock+{args.append}"] = ({**description, "cmdline": f"{description['cmdline']} {args.append}"},
                                                kernel)
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for _ in range(args.runs):
            for name, (desc, image) in variants.items():
                samples[name].append(boot(desc, image, initrd, work))
        base_wall = statistics.median(s[0] for s in samples["stock"])
        base_cpu = statistics.median(s[1] for s in samples["stock"])
        for name, values in samples.items():
            wall = statistics.median(s[0] for s in values)
            cpu = statistics.median(s[1] for s in values)
            print(f"{name}: QEMU start to the init's answer {wall * 1000:.0f} ms wall (x{wall / base_wall:.2f} stock), "
                  f"{cpu * 1000:.0f} ms QEMU CPU (x{cpu / base_cpu:.2f} stock), median of {args.runs}")
        print(f"load average {os.getloadavg()[0]:.1f} (wall above CPU time is the host's load)")


if __name__ == "__main__":
    main()
