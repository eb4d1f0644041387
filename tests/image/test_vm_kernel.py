"""The vm kernel as QEMU boots it: Debian's LZ4 bzImage unpacked to its PVH-entered ELF, reproducibly."""

from __future__ import annotations

import struct

import pytest

from cove.errors import CoveError
from cove.image import vmimage
from tests.conftest import require


@pytest.fixture(scope="module")
def bzimage() -> bytes:
    require("lz4")
    return vmimage.find_kernel(None).read_bytes()


def test_debian_kernel_unpacks_to_a_pvh_elf_the_same_each_time(bzimage: bytes) -> None:
    first = vmimage.boot_kernel(bzimage)
    assert first.startswith(b"\x7fELF\x02") and vmimage.has_pvh_entry(first)
    assert vmimage.boot_kernel(bzimage) == first  # reproducible: the launch measurement depends on it
    assert vmimage.boot_kernel(first) == first  # an ELF given as [vm] kernel boots as it is


def test_other_kernels_boot_as_they_are(bzimage: bytes) -> None:
    assert vmimage.boot_kernel(b"not a kernel" * 100) == b"not a kernel" * 100
    setup_sects = bzimage[0x1F1] or 4
    offset, _ = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    other = bzimage[:start] + b"\x28\xb5\x2f\xfd" + bzimage[start + 4 :]  # a zstd payload, say: not unpacked here
    assert vmimage.boot_kernel(other) == other


def test_a_damaged_payload_is_refused(bzimage: bytes) -> None:
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    end = (setup_sects + 1) * 512 + offset + length
    short = bzimage[: end - 4] + struct.pack("<I", 12345)  # the size trailer no longer matches
    with pytest.raises(CoveError, match="does not unpack"):
        vmimage.boot_kernel(short)
