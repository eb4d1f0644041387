"""Where a `vm` enclave's boot and memory go: QEMU's CPU and wall time to Cove's init, and the
guest memory the program cannot have, per variant of the same build.

Boots the launch inputs of a small vm build with the init's probe request (it
answers and powers off; no program runs) under TCG, alternating the variants
run by run so that the machine's load weighs on each alike, and prints the
medians and each variant's ratio to the built kernel measured in the same
run. CPU time (user + system of the QEMU process when the init answers) is
what the guest's boot costs; wall time above it is the host's load.

With `--memory`, each variant also boots once with `/bin/cat /proc/meminfo
/proc/self/status` as the program and prints, at the moment the program
runs (MemAvailable is the kernel's own estimate of what a program can still
get without swapping):
- in use: MemTotal - MemAvailable (kernel, init, initramfs, the program);
- withheld: the VM's RAM - MemAvailable (adds what the kernel reserved at
  boot and never counts in MemTotal: its own image, the page structures);
- the program's own: the image's files, which live in the initramfs (each
  rounded up to 4 KiB pages), and the program's private pages (cat's RssAnon
  and page tables, VmPTE, from its /proc/self/status);
- overhead: withheld - the program's own, the figure of the target
  (docs/performance.md), and in use - the program's own beside it.

Variants: `built` (what Cove boots), the other form of the same kernel
(`bzimage`, Debian's compressed file, which the guest decompresses after a
real-mode setup, or `pvh`, its ELF entered through the PVH note),
`built+ARGS` for `--append ARGS`, `built-ARGS` for `--drop ARGS` (those
words taken out of the measured command line), with `--mmio` the ports
on virtio-mmio as builds had them before (the same initramfs with the
virtio_mmio module added in an appended archive), and with `--before` the
build as it would have been made before the memory work: mmio ports,
without vmimage.MEMORY_CMDLINE, 48 MB more RAM. `--to-program` times each
boot to the program's exec (`R` on cove.ctl, the launch request of the
memory boot) instead of the init's answer to a probe.

    .venv/bin/python bench/vm_boot.py [--runs 7] [--memory] [--append "nokaslr"] [--drop WORDS] [--mmio]
                                      [--before] [--to-program] [--instance DIR]
"""

from __future__ import annotations

import argparse
import os
import re
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


def boot(
    description: dict[str, object], kernel: Path, initrd: Path, folder: Path, to_program: bool = False
) -> tuple[float, float]:
    """(wall s, QEMU CPU s) from QEMU's start to the init's answer to a probe request, or to the
    program's exec (the memory boot's program)."""
    if to_program:
        _, wall, cpu = _converse(description, kernel, initrd, folder, MEMORY_REQUEST, b"R\n")
    else:
        _, wall, cpu = _converse(description, kernel, initrd, folder, [b"Q"], b"X0\n")
    return wall, cpu


# The launch request of the memory boot (docs/backends.md): root, no network, no attestation.
MEMORY_PROGRAM = ["/bin/cat", "/proc/meminfo", "/proc/self/status"]
MEMORY_REQUEST = [f"A{a}".encode() for a in MEMORY_PROGRAM] + [
    b"U0",
    b"G0",
    b"C/",
    b"Hvm-boot",
    b"Nnone",
    b"P64",
    b"F1024",
    b"Ynone",
]


def _converse(
    description: dict[str, object], kernel: Path, initrd: Path, folder: Path, items: list[bytes], end: bytes
) -> tuple[bytes, float, float]:
    """Boot, send the launch request ITEMS, and collect cove.stdout until cove.ctl says END:
    (stdout, wall s, QEMU CPU s at END)."""
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
    out = pairs[vmimage.PORTS.index("cove.stdout")][0]
    try:
        body = b"".join(item + b"\0" for item in items)
        ctl.sendall(struct.pack("<I", len(body)) + body)
        answer, output, watched = b"", b"", [ctl, out]
        while time.monotonic() - started < 120:
            for ready in select.select(watched, [], [], 0.05)[0]:
                chunk = _receive(ready)
                if ready is out:
                    output += chunk
                    if not chunk:
                        watched.remove(out)  # the guest powers off once it has answered
                    continue
                if not chunk:
                    raise SystemExit(f"the guest ended without {end!r} (console: {folder / 'console.log'})")
                answer += chunk
            if end in answer:
                fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                wall = time.monotonic() - started
                while out in watched and select.select([out], [], [], 0.5)[0] and (chunk := _receive(out)):
                    output += chunk  # the program's last bytes may trail its exit code
                return output, wall, cpu
        raise SystemExit(f"the guest did not answer (console: {folder / 'console.log'})")
    finally:
        process.kill()
        process.wait()
        for pair in pairs:
            pair[0].close()


def _receive(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:  # QEMU is gone
        return b""


def image_files_kib(root: Path) -> int:
    """The image's files in KiB as the guest's rootfs holds them: each rounded up to whole 4 KiB pages."""
    files = (p for p in (root / "image").rglob("*") if p.is_file() and not p.is_symlink())
    return sum(-(-p.stat().st_size // 4096) * 4 for p in files)


def memory(description: dict[str, object], kernel: Path, initrd: Path, folder: Path, own_files: int) -> dict:
    """The memory figures of one boot, in MiB (see the module's docstring)."""
    output, _, _ = _converse(description, kernel, initrd, folder, MEMORY_REQUEST, b"X0\n")
    fields = {
        key: int(value.split()[0])
        for key, value in re.findall(r"^(\w+):\s+(\d+ kB)$", output.decode(errors="replace"), re.MULTILINE)
    }
    try:
        used = fields["MemTotal"] - fields["MemAvailable"]
        withheld = int(description["memory"]) // 1024 - fields["MemAvailable"]  # type: ignore[call-overload]
        own = own_files + fields["RssAnon"] + fields["VmPTE"]
    except KeyError as missing:
        raise SystemExit(f"the guest's program did not print {missing} (console: {folder / 'console.log'})") from None
    return {
        "vm": int(description["memory"]) / 2**20,  # type: ignore[call-overload]
        "used": used / 1024,
        "withheld": withheld / 1024,
        "own": own / 1024,
        "overhead": (withheld - own) / 1024,
        "used_overhead": (used - own) / 1024,
        "slab": fields["Slab"] / 1024,
    }


def mmio_variant(description: dict[str, object], initrd: Path, work: Path) -> tuple[dict[str, object], Path]:
    """The build's ports on virtio-mmio, as before they moved to PCI: the same initramfs with an
    archive appended that adds virtio_mmio.ko and loads it before virtio_console."""
    if not str(description["machine"]).startswith("microvm,pcie=on"):
        raise SystemExit("--mmio: this build's ports are already on virtio-mmio")
    version = vmimage.find_kernel(None).name.removeprefix("vmlinuz-")
    module = next((Path("/lib/modules") / version).rglob("virtio_mmio.ko"), None)
    if module is None:
        raise SystemExit(f"--mmio: kernel {version} has no virtio_mmio module")
    extra = work / "mmio"
    (extra / "cove" / "modules").mkdir(parents=True)
    (extra / "cove" / "modules" / module.name).write_bytes(module.read_bytes())
    order = subprocess.run(
        ["cpio", "-i", "--quiet", "--to-stdout", "cove/modules.order"], stdin=initrd.open("rb"), capture_output=True
    ).stdout.decode()
    before = order.index("virtio_console.ko")  # after virtio and virtio_ring, which it needs
    (extra / "cove" / "modules.order").write_text(f"{order[:before]}{module.name}\n{order[before:]}")
    names = "cove/modules.order\ncove/modules/virtio_mmio.ko\n"
    archive = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"], cwd=extra, input=names.encode(), capture_output=True, check=True
    ).stdout
    combined = work / "initrd-mmio.cpio"
    combined.write_bytes(initrd.read_bytes() + archive)
    devices = [str(d).replace("-pci:", "-device:", 1) for d in description["devices"]]  # type: ignore[attr-defined]
    return {**description, "machine": "microvm", "devices": devices}, combined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--append", default="", help="kernel arguments for a variant")
    parser.add_argument("--drop", default="", help="words of the measured command line a variant goes without")
    parser.add_argument("--mmio", action="store_true", help="a variant with the ports on virtio-mmio")
    parser.add_argument("--before", action="store_true", help="a variant as builds were before the memory work")
    parser.add_argument("--to-program", action="store_true", help="time boots to the program's exec")
    parser.add_argument("--memory", action="store_true", help="one boot per variant running cat /proc/meminfo")
    parser.add_argument("--instance", type=Path, help="a built vm instance (default: a new one with /bin/cat)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cove-vm-boot-") as tmp:
        work = Path(tmp)
        root = args.instance or build_instance(work)
        folder = root / "build" / vmimage.FOLDER
        description = cbor2.loads((folder / vmimage.LAUNCH).read_bytes())
        kernel, initrd = folder / vmimage.KERNEL, folder / vmimage.INITRD
        variants: dict[str, tuple[dict[str, object], Path, Path]] = {"built": (description, kernel, initrd)}
        other = other_form(kernel, work)
        if other is not None:
            variants[other[0]] = (description, other[1], initrd)
        if args.append:
            cmdline = f"{description['cmdline']} {args.append}"
            variants[f"built+{args.append}"] = ({**description, "cmdline": cmdline}, kernel, initrd)
        if args.drop:
            words = args.drop.split()
            cmdline = " ".join(w for w in description["cmdline"].split() if w not in words)
            variants[f"built-{args.drop}"] = ({**description, "cmdline": cmdline}, kernel, initrd)
        if args.mmio or args.before:
            mmio_description, mmio_initrd = mmio_variant(description, initrd, work)
            if args.mmio:
                variants["mmio"] = (mmio_description, kernel, mmio_initrd)
            if args.before:
                words = vmimage.MEMORY_CMDLINE.split()
                cmdline = " ".join(w for w in description["cmdline"].split() if w not in words)
                memory_before = description["memory"] + (48 << 20)  # 144 MB over the limit, not 96
                before = {**mmio_description, "cmdline": cmdline, "memory": memory_before}
                variants["before"] = (before, kernel, mmio_initrd)
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for _ in range(args.runs):
            for name, (desc, image, ramdisk) in variants.items():
                samples[name].append(boot(desc, image, ramdisk, work, args.to_program))
        base_wall = statistics.median(s[0] for s in samples["built"])
        base_cpu = statistics.median(s[1] for s in samples["built"])
        until = "the program's exec" if args.to_program else "the init's answer"
        for name, values in samples.items():
            wall = statistics.median(s[0] for s in values)
            cpu = statistics.median(s[1] for s in values)
            print(
                f"{name}: QEMU start to {until} {wall * 1000:.0f} ms wall (x{wall / base_wall:.2f} built), "
                f"{cpu * 1000:.0f} ms QEMU CPU (x{cpu / base_cpu:.2f} built), median of {args.runs}"
            )
        if args.memory:
            own_files = image_files_kib(root)
            for name, (desc, image, ramdisk) in variants.items():
                m = memory(desc, image, ramdisk, work, own_files)
                print(
                    f"{name}: guest RAM {m['vm']:.0f} MB; overhead {m['overhead']:.1f} MB "
                    f"(withheld {m['withheld']:.1f} MB: RAM - MemAvailable, less the program's own "
                    f"{m['own']:.1f} MB); in use {m['used']:.1f} MB (MemTotal - MemAvailable; "
                    f"{m['used_overhead']:.1f} MB less the program's own); slab {m['slab']:.1f} MB"
                )
        print(f"load average {os.getloadavg()[0]:.1f} (wall above CPU time is the host's load)")


if __name__ == "__main__":
    main()
