"""The vm guest's memory, in one real boot: the program finds its whole limit available when it
starts, in a VM of the measured size booted with the measured command line, whose memory
settings the guest's kernel applied, and whose init left no module files in the initramfs.

Before the guest's kernel settings and PCI ports (docs/performance.md) a 512 MB enclave's
program found about 505 MB available in its 660 MB guest. The figures themselves come from
bench/vm_boot.py --memory; this holds the promise they rest on.
"""

from __future__ import annotations

import re
from pathlib import Path

import cbor2
import pytest

from cove import config as cove_config
from cove.image import vmimage
from tests.conftest import require
from tests.e2e.helpers import make_instance

RESERVES = dict(word.removeprefix("sysctl.vm.").split("=") for word in vmimage.RESERVE_CMDLINE.split())


@pytest.fixture(scope="module")
def instance(cove, tmp_path_factory) -> Path:
    require("qemu-system-x86_64")
    return make_instance(cove, tmp_path_factory.mktemp("vm-memory"), options={("enclave", "backend"): '"vm"'})


def _initramfs_kib(initrd: bytes) -> tuple[int, int]:
    """(all regular files, those under cove/) of a newc archive, in KiB of whole 4 KiB pages."""
    total = cove = at = 0
    while True:
        header = initrd[at : at + 110]
        assert header[:6] == b"070701"
        mode, size, name_size = int(header[14:22], 16), int(header[54:62], 16), int(header[94:102], 16)
        name = initrd[at + 110 : at + 110 + name_size - 1].decode()
        at = (at + 110 + name_size + 3) & ~3
        if name == "TRAILER!!!":
            return total, cove
        if mode & 0o170000 == 0o100000:
            pages = -(-size // 4096) * 4
            total += pages
            cove += pages if name.startswith("cove/") else 0
        at = (at + size + 3) & ~3


def test_the_program_finds_its_memory_limit_available(cove, instance: Path) -> None:
    settings = [f"/proc/sys/vm/{name}" for name in RESERVES]
    out = cove.ok("run", "/bin/cat", "/proc/meminfo", *settings, "/proc/cmdline", cwd=instance).stdout
    meminfo = {key: int(value) << 10 for key, value in re.findall(r"^(\w+):\s+(\d+) kB$", out, re.MULTILINE)}
    limit = cove_config.parse((instance / "cove.toml").read_text()).resources.memory
    folder = instance / "build" / vmimage.FOLDER
    launch = cbor2.loads((folder / vmimage.LAUNCH).read_bytes())
    assert meminfo["MemAvailable"] >= limit, (meminfo["MemAvailable"] >> 20, limit >> 20)
    assert meminfo["MemTotal"] <= launch["memory"]  # the VM has the measured size, no more
    lines = out.rstrip("\n").splitlines()
    assert lines[-1] == launch["cmdline"]  # and the kernel the measured command line
    # the kernel applied the reserves' sysctls (an array's first value: ZONE_DMA's ratio)
    assert {name: line.split()[0] for name, line in zip(RESERVES, lines[-1 - len(RESERVES) : -1])} == RESERVES
    # the initramfs is a tmpfs: its files are Shmem, less the module files the init unlinked (~0.5 MB)
    files, modules = _initramfs_kib((folder / vmimage.INITRD).read_bytes())
    assert modules >= 256
    assert meminfo["Shmem"] >> 10 <= files - modules + 256, (meminfo["Shmem"] >> 10, files, modules)
