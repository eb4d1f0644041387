"""The vm backend's encrypted and host mounts without a boot: virtiofsd's id maps, the measured devices,
host sources checked as sim checks them, and a read-only host mount read-only below virtiofsd."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from cove import config as cove_config
from cove import hostids
from cove.errors import CoveError
from cove.image import vmimage
from cove.runtime import vm_shared
from cove.runtime.vm_shared import id_map

MOUNT = '[[mounts]]\ntarget = "{target}"\ntype = "encrypted"\nkey = "seal:mrsigner"\nwritable = {writable}\n'
HOST = '[[mounts]]\ntarget = "{target}"\ntype = "host"\nsource = "{source}"\n'


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
    with pytest.raises(CoveError, match="at most 16 encrypted and host mounts"):
        vmimage.shared_folders(many)
    # host mounts are virtio-fs devices too, in cove.toml's order; their host path is cove.toml's, measured
    # with the configuration as on sim, not a device's
    mixed = parsed(HOST.format(target="/h", source=tmp_path) + MOUNT.format(target="/data", writable="true"))
    assert vmimage.shared_folders(mixed) == [("cove-fs0", False, "/h"), ("cove-fs1", True, "/data")]
    assert devices(mixed) == [
        vmimage.SHARED_MEMORY,
        f"{vmimage.FS_DEVICE}cove-fs0:ro:/h",
        f"{vmimage.FS_DEVICE}cove-fs1:rw:/data",
    ]
    with pytest.raises(CoveError, match="at most 16 encrypted and host mounts"):
        vmimage.shared_folders(
            parsed("".join(HOST.format(target=f"/h{i}", source=tmp_path) for i in range(vmimage.MAX_SHARED + 1)))
        )


@pytest.fixture
def root_only():
    if os.geteuid() != 0:
        pytest.fail("these tests check a root-started enclave's host mounts: run them as root", pytrace=False)


def test_host_sources_are_refused_as_on_sim(tmp_path, root_only):
    uid, gid = hostids.enclave_range().host(0, 0)
    with pytest.raises(CoveError, match=f"host mount source {tmp_path}/gone does not exist"):
        vm_shared.check_host_source(str(tmp_path / "gone"), False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CoveError, match="is not a folder: the vm backend shares folders"):
        vm_shared.check_host_source(str(tmp_path / "file"), False)
    folder = tmp_path / "folder"
    folder.mkdir(0o755)
    vm_shared.check_host_source(str(folder), False)  # read-only: anyone's folder
    with pytest.raises(CoveError) as refused:  # host root's 0755 folder: the enclave's ids never write as root
        vm_shared.check_host_source(str(folder), True)
    assert f"not writable by the enclave's host user {uid}:{gid}" in refused.value.line()
    for owner, mode in (((uid, 0), 0o755), ((0, gid), 0o775), ((0, 0), 0o777)):
        os.chown(folder, *owner)
        folder.chmod(mode)
        vm_shared.check_host_source(str(folder), True)
    os.chown(folder, uid, gid)
    folder.chmod(0o555)  # its own, but not writable by its mode
    with pytest.raises(CoveError, match="not writable by the enclave's host user"):
        vm_shared.check_host_source(str(folder), True)


def _sandboxed(process) -> int:
    """The pid of virtiofsd's sandboxed child (it forks into its namespaces at start)."""
    for _ in range(100):
        for task in Path(f"/proc/{process.pid}/task").iterdir():
            children = (task / "children").read_text().split()
            if children:
                return int(children[0])
        time.sleep(0.05)
    raise AssertionError(f"virtiofsd made no sandbox: {process.poll()}")


@pytest.mark.parametrize("read_only", [True, False])
def test_a_read_only_host_mount_is_read_only_below_virtiofsd(tmp_path, root_only, read_only):
    """A guest that remounts its side read-write still meets a read-only bind on the host: virtiofsd's
    own root is read-only (it cannot lift that lock from its namespace), and writes through it fail."""
    source, run = tmp_path / "source", tmp_path / "run"
    source.mkdir(0o777)
    source.chmod(0o777)  # writable by anyone, so only the mount decides
    (source / "kept").write_text("x")
    run.mkdir(0o700)
    shared = vm_shared.start("cove-fs0", "/h", source, run, 1000, 1000, read_only, "host")
    try:
        child = _sandboxed(shared.process)
        root = Path(f"/proc/{child}/mountinfo").read_text().splitlines()
        (options,) = [line.split()[5] for line in root if line.split()[4] == "/"]
        assert options.split(",")[0] == ("ro" if read_only else "rw")
        assert sorted(os.listdir(f"/proc/{child}/root")) == ["kept"]
        try:
            Path(f"/proc/{child}/root/new").write_text("y")
        except OSError as exc:
            assert read_only and exc.errno == errno.EROFS
        else:
            assert not read_only and (source / "new").read_text() == "y"
        assert (source / "kept").read_text() == "x"
    finally:
        shared.stop()
    assert shared.process.returncode is not None and not shared.path.exists()
