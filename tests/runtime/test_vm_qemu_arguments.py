"""The QEMU command line follows the measured launch description: the ports' transport and the
kernel's memory settings come from it, so an older build boots as it was measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from cove import config as cove_config
from cove.image import vmimage
from cove.runtime import vm
from tests.conftest import require


def _arguments(description: dict) -> list[str]:
    require("qemu-system-x86_64")
    fds = list(range(100, 100 + len(vmimage.PORTS)))
    return vm.qemu_arguments(description, Path("vmlinuz"), Path("initrd.cpio"), "tcg", Path("console.log"), fds)


def _description(network: str) -> dict:
    config = cove_config.parse(f'[enclave]\nname = "x"\nbackend = "vm"\n[network]\nmode = "{network}"\n')
    return vmimage.describe(bytes(32), bytes(32), 4 << 20, config)


@pytest.mark.parametrize("network", ["none", "host"])
def test_a_new_build_puts_ports_and_network_on_pci(network: str) -> None:
    """On virtio-mmio QEMU offers 1,024-entry queues and the guest fills each port's with 4 KiB buffers."""
    description = _description(network)
    args = _arguments(description)
    assert args[args.index("-machine") + 1].startswith("microvm,pcie=on,")
    devices = [args[i + 1] for i, a in enumerate(args) if a == "-device"]
    assert devices[0].startswith("virtio-serial-pci,disable-legacy=on,max_ports=")
    assert ("virtio-net-pci,disable-legacy=on,netdev=net0" in devices) == (network == "host")
    assert not any(d.startswith(("virtio-serial-device", "virtio-net-device")) for d in devices)
    modules = [m.name for m in vmimage.module_files(vmimage.find_kernel(None))]
    assert "virtio_pci.ko" in modules and "virtio_mmio.ko" not in modules


def test_a_build_measured_with_mmio_ports_boots_with_them() -> None:
    description = {
        **_description("host"),
        "machine": "microvm",
        "devices": ["virtio-serial-device:" + ",".join(vmimage.PORTS), "isa-serial:console", "virtio-net-device:user"],
    }
    args = _arguments(description)
    assert args[args.index("-machine") + 1] == "microvm,x-option-roms=off"
    devices = [args[i + 1] for i, a in enumerate(args) if a == "-device"]
    assert devices[0] == f"virtio-serial-device,max_ports={len(vmimage.PORTS) + 1}"
    assert "virtio-net-device,netdev=net0" in devices


def test_the_measured_command_line_carries_the_memory_settings() -> None:
    """THP's watermarks alone held back ~45 MB of a 612 MB guest (docs/performance.md)."""
    words = _description("none")["cmdline"].split()
    for setting in ("transparent_hugepage=never", "lockdown=confidentiality", "percpu_alloc=page"):
        assert setting in words
    # the memory reserves, set by the kernel before the init (7.5 MB less withheld; docs/backends.md)
    for setting in (
        "sysctl.vm.min_free_kbytes=1024",
        "sysctl.vm.lowmem_reserve_ratio=0",
        "sysctl.vm.percpu_pagelist_high_fraction=1024",
    ):
        assert setting in words
    assert "panic=-1" in words and "rdinit=/init" in words
