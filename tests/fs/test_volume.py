"""The volume API: namespace operations, persistence, locking, key policies, leftovers."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

import pytest

from cove.fs.access import open_volume
from cove.fs.index import KeyPolicy
from cove.fs.volume import Volume, VolumeError

from securefs_helpers import host_files


@pytest.fixture(autouse=True)
def platform(tmp_path, monkeypatch):
    monkeypatch.setenv("COVE_PLATFORM_DIR", str(tmp_path / "platform"))


@pytest.fixture
def vol(tmp_path):
    key = os.urandom(16)
    volume = Volume.create(tmp_path / "vol", key, label="/v", policy=KeyPolicy.of("file:/k"), anchor="file")
    yield volume, key, tmp_path / "vol"
    volume.close()


def _errno(fn, *args) -> int:
    with pytest.raises(OSError) as caught:
        fn(*args)
    return caught.value.errno


def test_namespace_errors(vol):
    volume, _, _ = vol
    root = volume.root
    d = volume.mkdir(root, b"d", 0o755)
    volume.write_file("/d/f", b"x")
    assert _errno(volume.mkdir, root, b"d", 0o755) == errno.EEXIST
    assert _errno(volume.rmdir, root, b"d") == errno.ENOTEMPTY
    assert _errno(volume.unlink, root, b"d") == errno.EISDIR
    assert _errno(volume.rmdir, d, b"f") == errno.ENOTDIR
    assert _errno(volume.lookup, root, b"missing") == errno.ENOENT
    assert _errno(volume.mkdir, root, b"x" * 256, 0o755) == errno.ENAMETOOLONG
    assert _errno(volume.mkdir, root, b"a/b", 0o755) == errno.EINVAL
    assert _errno(volume.rename, root, b"d", d, b"inside") == errno.EINVAL  # into itself
    volume.write_file("/g", b"g")
    assert _errno(volume.rename, root, b"g", root, b"d") == errno.EISDIR
    assert _errno(volume.rename, root, b"d", root, b"g") == errno.ENOTDIR
    assert _errno(volume.rename, root, b"g", d, b"f", 1) == errno.EEXIST  # RENAME_NOREPLACE


def test_rename_exchange_and_over(vol):
    volume, key, path = vol
    volume.write_file("/a", b"A")
    volume.write_file("/b", b"B")
    volume.rename(volume.root, b"a", volume.root, b"b", 2)  # RENAME_EXCHANGE
    assert (volume.read_file("/a"), volume.read_file("/b")) == (b"B", b"A")
    replaced = volume.rename(volume.root, b"a", volume.root, b"b")
    assert replaced is not None and volume.read_file("/b") == b"B"
    volume.commit()
    assert len(host_files(path)) == 1  # the replaced file's host file is gone after the commit


def test_persistence_of_modes_owners_times_and_symlinks(vol, tmp_path):
    volume, key, path = vol
    node = volume.write_file("/dir/f", b"data", mode=0o600)
    volume.setattr(node, uid=1000, gid=1000, mtime=1_000_000_000)
    volume.symlink(volume.root, b"ln", b"dir/f")
    volume.close()
    with Volume.open(path, key) as again:
        f = again.resolve("/dir/f")
        assert (f.mode & 0o7777, f.uid, f.gid, f.mtime, f.size) == (0o600, 1000, 1000, 1_000_000_000, 4)
        assert again.resolve("/ln").target == b"dir/f"


def test_an_unlinked_open_file_works_until_closed_and_leaves_nothing(vol):
    volume, key, path = vol
    node = volume.write_file("/ghost", b"boo")
    volume.commit()
    volume.acquire(node)
    volume.unlink(volume.root, b"ghost")
    volume.commit()
    volume.write(node, 3, b"!")
    assert volume.read(node, 0, 10) == b"boo!"
    volume.release(node)
    volume.commit()
    assert host_files(path) == {}


def test_a_volume_is_used_by_one_process_at_a_time(vol):
    _, key, path = vol
    with pytest.raises(VolumeError, match="is in use"):
        Volume.open(path, key)


def test_uncommitted_changes_are_lost_like_a_crash(vol):
    volume, key, path = vol
    volume.write_file("/kept", b"1")
    volume.commit()
    volume.write_file("/lost", b"2")
    node = volume.resolve("/kept")
    volume.acquire(node)
    volume.write(node, 0, b"changed")
    volume.release(node)
    # drop the volume without committing (as a killed process would)
    for handle_node in list(volume._handles.values()):
        handle_node.handle._release()
        handle_node.handle = None
    volume._handles.clear()
    volume._unlock()
    with Volume.open(path, key) as again:
        assert again.read_file("/kept") == b"1"
        assert _errno(again.resolve, "/lost") == errno.ENOENT
        assert again.problems == [] and again.verify() == []


@dataclass(frozen=True)
class Ident:
    measurement: bytes = b"\x01" * 32
    signer: bytes = b"\x02" * 32
    product_id: int = 1
    svn: int = 1
    debug: bool = False


def test_sealed_volume_svn_upgrade_rewraps(tmp_path):
    path = str(tmp_path / "sealed")
    with open_volume(path, "seal:mrsigner", Ident(svn=1), label="/s", create=True, anchor="file") as volume:
        volume.write_file("/f", b"svn 1 data")
        assert volume.policy == KeyPolicy("seal:mrsigner", 1)
    with open_volume(path, "seal:mrsigner", Ident(svn=4), label="/s") as volume:
        assert volume.read_file("/f") == b"svn 1 data"
        assert volume.policy == KeyPolicy("seal:mrsigner", 4)
    with open_volume(
        path, "seal:mrsigner", Ident(svn=4, measurement=b"\x09" * 32), label="/s", writable=False
    ) as volume:
        assert volume.read_file("/f") == b"svn 1 data"  # mrsigner: another build of the same signer
    with pytest.raises(Exception, match="sealed at svn 4 cannot be unsealed by an enclave with svn 3"):
        open_volume(path, "seal:mrsigner", Ident(svn=3), label="/s")
    with pytest.raises(VolumeError, match="comes from seal:mrsigner, not seal:mrenclave"):
        open_volume(path, "seal:mrenclave", Ident(svn=4), label="/s")


def test_read_only_open_of_a_missing_volume_is_refused(tmp_path):
    with pytest.raises(VolumeError, match="holds no volume yet, and the mount is read-only"):
        open_volume(str(tmp_path / "none"), "insecure:" + "00" * 16, None, label="/x", writable=False, create=True)


def test_rewriting_a_file_from_zero_leaves_the_old_host_file_alone_until_the_commit(vol):
    volume, key, path = vol
    volume.write_file("/f", b"old content" * 1000)
    volume.commit()
    ((old_id, old_path),) = host_files(path).items()
    before = old_path.read_bytes()
    volume.write_file("/f", b"new content")  # truncates to zero, then writes
    assert old_path.read_bytes() == before
    assert not os.path.exists(str(old_path) + ".gramine.recovery")  # nothing had to be logged
    volume.commit()
    files = host_files(path)
    assert old_id not in files and len(files) == 1
    assert volume.read_file("/f") == b"new content"
