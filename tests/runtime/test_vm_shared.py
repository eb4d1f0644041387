"""The vm backend's encrypted mounts without a boot: virtiofsd's id maps and the measured devices."""

from __future__ import annotations

import pytest

from cove import config as cove_config
from cove.errors import CoveError
from cove.image import vmimage
from cove.runtime.vm_shared import id_map

MOUNT = '[[mounts]]\ntarget = "{target}"\ntype = "encrypted"\nkey = "seal:mrsigner"\nwritable = {writable}\n'


def _ranges(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(f) for f in line.split()) for line in text.splitlines()]  # type: ignore[misc]


@pytest.mark.parametrize("own", [0, 1, 1000, 65535])
def test_id_map_gives_the_program_the_enclave_users_stored_id_and_covers_the_range_once(own):
    start, count = 100000, 65536
    ranges = _ranges(id_map(start, count, own))
    inside = {i + k: o + k for i, o, n in ranges for k in range(n)}
    assert len(inside) == count and set(inside) == set(range(count))  # every guest id, once
    assert sorted(inside.values()) == list(range(start, start + count))  # onto the range, never host root
    assert inside[own] == start  # stored as 0: the enclave's user, as on sim
    assert len(ranges) <= 4


def test_devices_and_modules_only_for_builds_with_encrypted_mounts(tmp_path):
    def parsed(extra: str) -> cove_config.Config:
        path = tmp_path / "cove.toml"
        path.write_text('[enclave]\nname = "x"\nbackend = "vm"\n' + extra)
        return cove_config.load(path)

    def devices(config: cove_config.Config) -> list[str]:
        return vmimage.describe(b"k" * 32, b"i" * 32, 1 << 20, config)["devices"][len(vmimage.DEVICES) :]

    plain = parsed("")
    assert vmimage.shared_folders(plain) == [] and devices(plain) == []
    two = parsed(MOUNT.format(target="/data", writable="true") + MOUNT.format(target="/ro", writable="false"))
    assert vmimage.shared_folders(two) == [("cove-fs0", True, "/data"), ("cove-fs1", False, "/ro")]
    assert devices(two) == [
        vmimage.SHARED_MEMORY,
        f"{vmimage.FS_DEVICE}cove-fs0:rw:/data",
        f"{vmimage.FS_DEVICE}cove-fs1:ro:/ro",
    ]
    many = parsed("".join(MOUNT.format(target=f"/m{i}", writable="true") for i in range(vmimage.MAX_SHARED + 1)))
    with pytest.raises(CoveError, match="at most 16 encrypted mounts"):
        vmimage.shared_folders(many)
