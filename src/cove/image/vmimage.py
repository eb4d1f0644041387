"""The launch inputs of a `vm` enclave, built and measured by `cove build`.

A `vm` enclave boots a kernel taken from a Debian package straight into an
initramfs that holds Cove's static guest init, the few virtio modules it
loads (and fuse and virtiofs when cove.toml has encrypted or host mounts, each a
measured virtio-fs device), and the enclave image under /image (none in a --encrypt-image build, whose
root the host serves over a measured virtio-fs device instead). The initramfs is a newc cpio made
here byte for byte the same from the same inputs (sorted paths, fixed
owners, times and inode numbers), so the same image, kernel and
configuration always measure the same. The launch measurement is the
SHA-256 of the canonical CBOR of the launch description (kernel and
initramfs digests, command line, machine, vCPUs, memory, devices); it is
recorded in the signed manifest, and the launcher boots only inputs that
hash to it (docs/backends.md).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import BinaryIO

import cbor2

from cove.config import Config
from cove.decode import Fields, decode_cbor
from cove.errors import CoveError, IntegrityError, SetupError, file_system_error
from cove.image.tree import CHUNK, DIRECTORY, FILE, SYMLINK, Entry
from cove.util import write_atomic

FORMAT = "cove-vm-launch/1"
FOLDER = "vm"
KERNEL, INITRD, LAUNCH = "vmlinuz", "initrd.cpio", "launch.cbor"
# The ports and the network device sit on microvm's PCIe bus, not on virtio-mmio: QEMU offers every
# virtio-mmio queue at its maximum of 1,024 entries, and the guest fills each port's receive queue
# with a 4 KiB buffer per entry (4 MB a port, 24 MB in all); over PCI a queue has 128 (docs/performance.md).
MACHINE = "microvm,pcie=on"
# Ports of the virtio-serial device, in this order (the guest finds them by name).
# Each port costs the guest 0.5 MB of receive buffers (docs/performance.md): quote and report share one.
PORTS = ("cove.ctl", "cove.stdin", "cove.stdout", "cove.stderr", "cove.attest")
DEVICES = ("virtio-serial-pci:" + ",".join(PORTS), "isa-serial:console")
MODULES = ("virtio_pci", "virtio_console", "virtio_net")
# [network] mode = "host": QEMU's user-mode network (NAT; the host is 10.0.2.2, the guest 10.0.2.15).
NET_DEVICE = "virtio-net-pci:user"
# Encrypted mounts (the host's secure file system server's view) and host mounts (a host folder)
# exported over virtio-fs (docs/backends.md). Only a build with such mounts carries the modules
# and the devices, so other boots don't pay.
FS_MODULES = ("virtiofs",)  # and fuse, which it needs (modules.dep); its device is on the PCIe bus
FS_DEVICE = "vhost-user-fs-pci:"  # + "TAG:rw|ro:TARGET", one per encrypted or host mount
# A build made with --encrypt-image: the initramfs has no image; the root is the host's verifying,
# decrypting view of build/image.enc (cove.fs.encrypted_image), exported read-only over virtio-fs once
# the key was released, and mounted by the guest init at /image (docs/backends.md, "Encrypted image").
ROOT_TAG = "cove-root"
ROOT_DEVICE = f"{FS_DEVICE}{ROOT_TAG}:ro:/"
# [vm] tpm_device: the VM's vTPM as the guest's TPM 2.0 (cove.runtime.vm_tpmdev). microvm's ACPI
# tables describe no TPM, so the kernel's built-in tpm_tis is told to take the TIS registers at
# their fixed address (force), and polls them (no interrupt line is described either).
TPM_DEVICE = "tpm-tis:vtpm"
TPM_CMDLINE = "tpm_tis.force=1 tpm_tis.interrupts=0"
SHARED_MEMORY = "memory-backend-memfd:shared"  # vhost-user needs guest RAM the host process can map
MAX_SHARED = 16  # encrypted and host mounts a vm enclave may have (the guest init's table)
LAUNCH_KEYS = ("format", "kernel", "initrd", "cmdline", "machine", "vcpus", "memory", "devices")
LAUNCH_LIMIT = 64 << 10  # a command line, a machine name and a few device names
# tsc_early_khz and lpj: a TCG guest cannot calibrate against the emulated PIT on a busy host and
# may hang there (docs/backends.md); cryptomgr.notests skips the self-tests of every crypto
# algorithm the kernel registers, a fifth of the boot's CPU time under TCG.
# MEMORY_CMDLINE: what the stock kernel keeps from the program (bench/vm_boot.py --memory, one boot
# each, docs/performance.md). transparent_hugepage=never: with THP on, khugepaged raises
# min_free_kbytes to 5 % of RAM and the watermarks above it hold back ~50 MB; lockdown=confidentiality:
# tracefs then creates no inodes for its ~1,500 trace events (9 MB of slab, and boot time under
# TCG), and the guest kernel refuses /dev/mem, kprobes and unsigned modules (Debian's are signed);
# percpu_alloc=page: per-CPU areas in 4 KiB pages, not 2 MB units (5 MB); dhash_entries and
# ihash_entries: dentry and inode hash tables sized for an enclave's files, not for all of RAM (1.3 MB).
# RESERVE_CMDLINE: sysctls the kernel sets before it starts the init (docs/backends.md, "Memory
# reserves"; 7.5 MB in all). min_free_kbytes 1024, not the ~3,000 the kernel derives from RAM: the
# zones' watermarks keep 2 MB, not 4.3 MB, from the program; lowmem_reserve_ratio 0 for ZONE_DMA
# (its first value; the others stay): no 2.2 MB of the 16 MB DMA zone held for GFP_DMA
# allocations, which nothing in this guest makes (no ISA devices; virtio's buffers take any zone);
# percpu_pagelist_high_fraction 1024: each CPU's list of free pages, which MemAvailable does not
# count, holds at most 1/1024 of the zone (0.5 MB), not the low watermark's worth.
RESERVE_CMDLINE = (
    "sysctl.vm.min_free_kbytes=1024 sysctl.vm.lowmem_reserve_ratio=0 sysctl.vm.percpu_pagelist_high_fraction=1024"
)
MEMORY_CMDLINE = (
    "transparent_hugepage=never lockdown=confidentiality percpu_alloc=page dhash_entries=16384 ihash_entries=8192 "
    + RESERVE_CMDLINE
)
BASE_CMDLINE = (
    "console=ttyS0 quiet loglevel=1 panic=-1 reboot=t rdinit=/init "
    "tsc=reliable tsc_early_khz=2600000 lpj=10400000 no_timer_check cryptomgr.notests "
    f"8250.nr_uarts=1 i8042.noaux i8042.nokbd i8042.nopnp {MEMORY_CMDLINE}"
)
# The guest's own memory beyond the program's limit and the initramfs: what the VM gives that the
# program cannot have when it starts (the kernel's image, page structures, slab, reserves: 70 MB
# at 1 vCPU and 512 MB, bench/vm_boot.py --memory), with room for more vCPUs (0.6 MB each) and
# the network device.
GUEST_OVERHEAD = 96 << 20
INIT_SOURCE = Path(__file__).resolve().parent.parent / "guest" / "init.c"
LZ4_LEGACY = b"\x02\x21\x4c\x18"  # the kernel's LZ4 payload format
XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point QEMU's ELF loader looks for
ALWAYS = ("proc", "dev", "tmp")  # mount points the guest init uses, whatever the image holds


def find_kernel(configured: str | None) -> Path:
    """The kernel to boot: [vm] kernel, else the newest Debian cloud kernel, else the newest in /boot."""
    if configured:
        path = Path(configured)
        if not path.is_file():
            raise CoveError(
                f"[vm] kernel {configured} does not exist", "install linux-image-cloud-amd64 (scripts/setup)"
            )
        return path
    boot = Path(os.environ.get("COVE_VM_BOOT", "/boot"))
    found = sorted(boot.glob("vmlinuz-*-cloud-amd64")) or sorted(boot.glob("vmlinuz-*"))
    if not found:
        raise SetupError(f"no kernel in {boot} for the vm backend", "run scripts/setup (linux-image-cloud-amd64)")
    return found[-1]


def boot_kernel(bzimage: bytes) -> bytes:
    """What QEMU boots: the ELF kernel inside an LZ4-compressed bzImage when it has a PVH entry.

    Entered through its PVH note, the guest skips the decompression and the
    real-mode setup, about an eighth of a TCG boot's CPU time
    (bench/vm_boot.py). Anything else (another compression, no PVH note, an
    ELF given as [vm] kernel) is booted as it is. Derived only from the
    package's file, so a build is as reproducible as before.
    """
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        return bzimage
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)  # payload_offset, payload_length
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    if not payload.startswith(LZ4_LEGACY) or len(payload) < 8:
        return bzimage
    lz4 = shutil.which("lz4")
    if lz4 is None:
        raise SetupError("lz4 is needed to unpack the vm kernel", "run scripts/setup (lz4)")
    size = struct.unpack("<I", payload[-4:])[0]  # the build appends the uncompressed size
    done = subprocess.run([lz4, "-dc"], input=payload[:-4], capture_output=True)
    elf = done.stdout
    if done.returncode != 0 or len(elf) != size:
        raise CoveError("the vm kernel's compressed payload does not unpack", "check [vm] kernel")
    return elf if has_pvh_entry(elf) else bzimage


def has_pvh_entry(elf: bytes) -> bool:
    """Whether a 64-bit ELF kernel has the Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)."""
    if elf[:5] != b"\x7fELF\x02" or len(elf) < 64:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for index in range(phnum):
        kind, _flags, offset, _vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", elf, phoff + index * phentsize)
        if kind != 4:  # PT_NOTE
            continue
        position, end = offset, min(offset + filesz, len(elf))
        while position + 12 <= end:
            namesz, descsz, note = struct.unpack_from("<III", elf, position)
            name = elf[position + 12 : position + 12 + namesz]
            if name == b"Xen\0" and note == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            position += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def shared_folders(config: Config) -> list[tuple[str, bool, str]]:
    """(virtio-fs tag, writable, target) of each encrypted or host mount, in cove.toml's order.
    The host folder's path is not a device's: cove.toml's measured mounts name it, as on sim."""
    shared = [m for m in config.mounts if m.type in ("encrypted", "host")]
    if len(shared) > MAX_SHARED:
        raise CoveError(
            f"a vm enclave has at most {MAX_SHARED} encrypted and host mounts, not {len(shared)}", "merge some of them"
        )
    return [(f"cove-fs{index}", m.writable, m.target) for index, m in enumerate(shared)]


def module_files(kernel: Path, extra: tuple[str, ...] = ()) -> list[Path]:
    """The modules the guest init loads, dependencies first, from the kernel's /lib/modules."""
    version = kernel.name.removeprefix("vmlinuz-")
    base = Path("/lib/modules") / version
    try:
        lines = (base / "modules.dep").read_text().splitlines()
    except OSError:
        raise SetupError(
            f"no modules for kernel {version} in {base}", "install the kernel's package (linux-image-cloud-amd64)"
        ) from None
    deps: dict[str, list[str]] = {}
    for line in lines:
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {re.sub(r"\.ko(\..*)?$", "", os.path.basename(p)).replace("-", "_"): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        for dep in deps.get(path, []):
            visit(dep)
        if path not in order:
            order.append(path)

    for name in MODULES + extra:
        if name in by_name:
            visit(by_name[name])  # a kernel with it built in needs nothing here
    for path in order:
        if not path.endswith(".ko"):
            raise SetupError(f"module {path} is compressed; the guest init loads plain .ko files")
    return [base / p for p in order]


def init_binary() -> bytes:
    """Cove's static guest init, compiled once per source text (gcc -static, no build id: reproducible)."""
    source = INIT_SOURCE.read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cove" / "vm"
    target = cache / f"init-{hashlib.sha256(source).hexdigest()[:16]}"
    if target.is_file():
        return target.read_bytes()
    gcc = shutil.which("gcc")
    if gcc is None:
        raise SetupError("gcc is needed to build the vm guest init", "run scripts/setup (gcc libc6-dev)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / "init"
        done = subprocess.run(
            [
                gcc,
                "-static",
                "-O2",
                "-Wl,--build-id=none",
                f"-ffile-prefix-map={INIT_SOURCE.parent}=.",
                "-o",
                str(out),
                str(INIT_SOURCE),
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SetupError(
                f"cannot build the vm guest init: {done.stderr.strip().splitlines()[-1:]}",
                "run scripts/setup (gcc libc6-dev provide a static libc)",
            )
        os.replace(out, target)
    return target.read_bytes()


class _Cpio:
    """A newc archive with fixed owners, times and inode numbers."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.ino = 0
        self.digest = hashlib.sha256()
        self.size = 0

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.digest.update(data)
        self.size += len(data)

    def _pad(self) -> None:
        if self.size % 4:
            self._write(b"\0" * (4 - self.size % 4))

    def header(self, name: str, mode: int, size: int, nlink: int = 1) -> None:
        self.ino += 1
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(encoded), 0)
        self._write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self._write(encoded)
        self._pad()

    def data(self, data: bytes) -> None:
        self._write(data)

    def end_file(self) -> None:
        self._pad()

    def directory(self, name: str, mode: int = 0o755) -> None:
        self.header(name, 0o040000 | mode, 0, 2)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        self.header(name, 0o100000 | mode, len(data))
        self.data(data)
        self.end_file()

    def trailer(self) -> None:
        self.header("TRAILER!!!", 0, 0)
        self.ino = 0


def write_initrd(
    image: Path, entries: list[Entry], mount_points: list[str], init: bytes, modules: list[Path], dest: Path
) -> bytes:
    """Write the initramfs to dest (atomically); its SHA-256. Each image file must match its entry."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            archive = _Cpio(out)
            archive.file("init", init)
            archive.directory("cove")
            archive.directory("cove/modules")
            for module in modules:
                archive.file(f"cove/modules/{module.name}", module.read_bytes(), 0o644)
            archive.file("cove/modules.order", "".join(f"{m.name}\n" for m in modules).encode(), 0o644)
            archive.directory("image")
            listed = {e.path for e in entries}
            wanted = {p.strip("/") for p in mount_points if p.strip("/")}
            wanted |= {"/".join(p.split("/")[:i]) for p in wanted for i in range(1, p.count("/") + 1)}
            extra = sorted(wanted - listed)
            for entry in sorted(entries + [Entry(p, DIRECTORY, 0o755) for p in extra], key=lambda e: e.path):
                _add_entry(archive, image, entry)
            archive.trailer()
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return archive.digest.digest()


def _add_entry(archive: _Cpio, image: Path, entry: Entry) -> None:
    name = f"image/{entry.path}"
    if entry.type == DIRECTORY:
        archive.directory(name, entry.mode)
    elif entry.type == SYMLINK:
        target = entry.target.encode()
        archive.header(name, 0o120000 | 0o777, len(target))
        archive.data(target)
        archive.end_file()
    elif entry.type == FILE:
        archive.header(name, 0o100000 | entry.mode, entry.size)
        digest = hashlib.sha256()
        fd = os.open(image / entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        size = 0
        try:
            while size < entry.size and (chunk := os.read(fd, min(CHUNK, entry.size - size))):
                digest.update(chunk)
                archive.data(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        if size != entry.size or not hmac.compare_digest(digest.digest(), entry.digest):
            raise IntegrityError(f"image/{entry.path} changed while the initramfs was written", "build again")
        archive.end_file()


def memory_bytes(config: Config, initrd_size: int) -> int:
    """The VM's memory: the program's limit, the initramfs (it lives in RAM) and the guest's overhead."""
    total = config.resources.memory + initrd_size + GUEST_OVERHEAD
    return -(-total // (2 << 20)) * (2 << 20)


def cmdline(config: Config) -> str:
    tpm = f" {TPM_CMDLINE}" if config.vm.tpm_device else ""
    return f"{BASE_CMDLINE}{tpm} {config.vm.kernel_args}".strip()


def describe(
    kernel_digest: bytes, initrd_digest: bytes, initrd_size: int, config: Config, encrypted_root: bool = False
) -> dict:
    """The launch description: everything the VM is made of, in the form that is measured.
    ENCRYPTED_ROOT: the root comes over virtio-fs (ROOT_DEVICE), not in the initramfs."""
    return {
        "format": FORMAT,
        "kernel": kernel_digest,
        "initrd": initrd_digest,
        "cmdline": cmdline(config),
        "machine": MACHINE,
        "vcpus": config.vm.vcpus,
        "memory": memory_bytes(config, initrd_size),
        "devices": list(DEVICES)
        + ([NET_DEVICE] if config.network.mode == "host" else [])
        + _fs_devices(config, encrypted_root)
        + ([TPM_DEVICE] if config.vm.tpm_device else []),
    }


def _fs_devices(config: Config, encrypted_root: bool = False) -> list[str]:
    shared = [
        f"{FS_DEVICE}{tag}:{'rw' if writable else 'ro'}:{target}" for tag, writable, target in shared_folders(config)
    ]
    shared = ([ROOT_DEVICE] if encrypted_root else []) + shared
    return [SHARED_MEMORY, *shared] if shared else []


def tpm_device(description: dict) -> bool:
    """Whether a (checked) launch description gives the guest the vTPM as its TPM device."""
    return TPM_DEVICE in description.get("devices", ())


def encrypted_root(description: dict) -> bool:
    """Whether a (checked) launch description boots the root over virtio-fs (a --encrypt-image build)."""
    return ROOT_DEVICE in description.get("devices", ())


def measure(description: dict) -> bytes:
    return hashlib.sha256(cbor2.dumps(description, canonical=True)).digest()


def build(image: Path, entries: list[Entry], config: Config, build_dir: Path, encrypted: bool = False) -> dict:
    """Write build/vm/{vmlinuz,initrd.cpio,launch.cbor}; the manifest's launch section.
    ENCRYPTED (--encrypt-image): no image file enters the initramfs, which then holds only the init
    and modules; the root's content is measured by the manifest's listing, its device by the launch."""
    kernel = find_kernel(config.vm.kernel)
    modules = module_files(kernel, FS_MODULES if shared_folders(config) or encrypted else ())
    folder = build_dir / FOLDER
    folder.mkdir(exist_ok=True)
    kernel_bytes = boot_kernel(kernel.read_bytes())
    write_atomic(folder / KERNEL, kernel_bytes)
    mount_points = [] if encrypted else [*ALWAYS, *(m.target for m in config.mounts)]
    initrd_digest = write_initrd(
        image, [] if encrypted else entries, mount_points, init_binary(), modules, folder / INITRD
    )
    description = describe(
        hashlib.sha256(kernel_bytes).digest(), initrd_digest, (folder / INITRD).stat().st_size, config, encrypted
    )
    write_atomic(folder / LAUNCH, cbor2.dumps(description, canonical=True))
    return {"type": "vm", "measurement": measure(description)}


def load(build_dir: Path, expected: bytes, dest: Path) -> tuple[dict, Path, Path]:
    """The launch description of a build, checked against the signed launch measurement.

    Kernel and initramfs are copied into the private folder dest while they
    are hashed, so what boots is what was checked; returns the description
    and the two copies, or raises IntegrityError naming what differs.
    """
    description = _checked(build_dir, expected, dest)
    return description, dest / KERNEL, dest / INITRD


def check(build_dir: Path, expected: bytes) -> None:
    """Raise IntegrityError unless a build's launch files match the signed launch measurement.

    The node's store calls it at import, so a tampered kernel or initramfs is
    never stored under the image id of the signed build it claims to be.
    """
    _checked(build_dir, expected, None)


def _checked(build_dir: Path, expected: bytes, dest: Path | None) -> dict:
    folder = build_dir / FOLDER
    try:
        data = (folder / LAUNCH).read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"{FOLDER}/{LAUNCH} is missing from {build_dir}", "build with `cove build`") from None
    except OSError as exc:
        raise file_system_error(exc) from None
    description = _read_launch(data)
    if not hmac.compare_digest(measure(description), expected):
        raise IntegrityError(
            "the vm launch description (command line, machine, size) differs from the signed launch measurement",
            "rebuild with `cove build`",
        )
    for name, key in ((KERNEL, "kernel"), (INITRD, "initrd")):
        try:
            digest = _copy(folder / name, None if dest is None else dest / name)
        except FileNotFoundError:
            raise IntegrityError(f"{FOLDER}/{name} is missing from {build_dir}", "build with `cove build`") from None
        if not hmac.compare_digest(digest, bytes(description[key])):
            raise IntegrityError(
                f"the vm {key} {FOLDER}/{name} differs from the signed launch measurement", "rebuild with `cove build`"
            )
    return description


def _malformed(message: str) -> IntegrityError:
    return IntegrityError(message, "rebuild with `cove build`")


def _read_launch(data: bytes) -> dict:
    """The launch description's fields, checked before anything reads them (the measurement is compared after)."""
    where = f"{FOLDER}/{LAUNCH}"
    fields = Fields(decode_cbor(data, _malformed, where, limit=LAUNCH_LIMIT), where, _malformed, allowed=LAUNCH_KEYS)
    if fields.text("format", max_len=64) != FORMAT:
        raise _malformed(f"{where} is not a {FORMAT} description")
    fields.bytes("kernel", 32)
    fields.bytes("initrd", 32)
    fields.text("cmdline", max_len=4096)
    fields.text("machine")
    fields.integer("vcpus", 1, 1024)
    fields.integer("memory", 1)
    fields.strings("devices", max_items=64, max_len=4096)
    return dict(fields.map)


def _copy(source: Path, dest: Path | None) -> bytes:
    """The SHA-256 of source, written to dest (a new file) on the way when dest is given."""
    digest = hashlib.sha256()
    with open(source, "rb") as src:
        out = open(dest, "xb") if dest is not None else None
        try:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                if out is not None:
                    out.write(chunk)
        finally:
            if out is not None:
                out.close()
    return digest.digest()
