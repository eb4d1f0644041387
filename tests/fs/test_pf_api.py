"""The ProtectedFile API: modes, rename, root MAC, recovery, misuse errors."""

from __future__ import annotations

import os

import pytest

from cove.fs import FileIntegrityError, ProtectedFile, ProtectedFileError, read_header
from cove.fs.layout import NODE_SIZE

from pf_helpers import host, key, make_file, read_all  # noqa: F401 (fixtures)


def test_modes(host, key):
    with pytest.raises(ProtectedFileError, match="no such file"):
        ProtectedFile.open(host, key, "a", "r")
    make_file(host, key, b"one", logical="a")
    with pytest.raises(ProtectedFileError, match="already exists"):
        ProtectedFile.open(host, key, "a", "x")
    with ProtectedFile.open(host, key, "a", "r") as f:
        with pytest.raises(ProtectedFileError, match="read-only"):
            f.write(0, b"x")
        with pytest.raises(ProtectedFileError, match="read-only"):
            f.truncate(0)
    with ProtectedFile.open(host, key, "a", "w") as f:  # replaces
        assert f.size() == 0
    with pytest.raises(ProtectedFileError, match="mode"):
        ProtectedFile.open(host, key, "a", "a")
    with pytest.raises(ProtectedFileError, match="16 bytes"):
        ProtectedFile.open(host, b"short", "a", "r")
    with pytest.raises(ProtectedFileError, match="at most 771"):
        ProtectedFile.open(host, key, "p" * 772, "w")
    assert [p for p in os.listdir(os.path.dirname(host))] == ["file.pf"]  # no temp left


def test_closed_handle(host, key):
    f = ProtectedFile.open(host, key, "a", "w")
    f.close()
    with pytest.raises(ProtectedFileError, match="closed"):
        f.read(0, 1)


def test_writer_is_exclusive(host, key):
    make_file(host, key, b"x", logical="a")
    with ProtectedFile.open(host, key, "a", "r+"):
        with pytest.raises(ProtectedFileError, match="already open"):
            ProtectedFile.open(host, key, "a", "r")


def test_rename_rebinds_the_path(host, key):
    make_file(host, key, b"content", logical="old/name")
    with ProtectedFile.open(host, key, "old/name", "r+") as f:
        f.rename("new/name")
        assert f.logical_path == "new/name"
    assert read_all(host, key, "new/name") == b"content"
    with pytest.raises(FileIntegrityError, match="bound to 'new/name', opened as 'old/name'"):
        read_all(host, key, "old/name")


def test_root_mac_tracks_every_commit(host, key):
    mac1 = make_file(host, key, b"a" * 10_000)
    assert read_header(host).mac == mac1 and len(mac1) == 16
    with ProtectedFile.open(host, key, "dir/file", "r+", expected_root_mac=mac1) as f:
        assert f.root_mac() == mac1  # nothing changed
        f.write(5000, b"b")
        mac2 = f.root_mac()
    assert mac2 != mac1
    ProtectedFile.open(host, key, "dir/file", "r", expected_root_mac=mac2).close()


def test_uncommitted_changes_are_lost_on_crash_without_close(host, key):
    make_file(host, key, b"committed")
    f = ProtectedFile.open(host, key, "dir/file", "r+")
    f.write(0, b"X" * 100_000)
    f._fd, fd = -1, f._fd  # simulate a process dying: no close, no commit
    os.close(fd)
    f._closed = True
    assert read_all(host, key) == b"committed"


def test_recovery_rolls_back_a_transaction_in_flight(host, key):
    data = os.urandom(600_000)
    make_file(host, key, data)
    f = ProtectedFile.open(host, key, "dir/file", "r+", cache_bytes=32 << 10)
    f.write(0, os.urandom(500_000))  # tiny cache: dirty nodes written back in place
    assert open(host, "rb").read(59)[58] & 1  # has-pending-write is set on disk
    f._journal.close(remove=False)
    os.close(f._fd)
    f._fd, f._closed = -1, True
    assert read_all(host, key) == data
    assert not open(host, "rb").read(59)[58] & 1


def test_commit_removes_recovery_file_and_trims(host, key):
    make_file(host, key, os.urandom(1_000_000))
    with ProtectedFile.open(host, key, "dir/file", "r+") as f:
        f.truncate(10)
    assert os.path.getsize(host) == NODE_SIZE
    assert not os.path.exists(host + ".gramine.recovery")
    assert read_all(host, key) == read_all(host, key)[:10]


def test_large_sparse_extension_is_bounded_in_memory(host, key):
    with ProtectedFile.open(host, key, "dir/file", "w", cache_bytes=64 << 10) as f:
        f.truncate(40 << 20)
        assert len(f._tree.cache) <= f._tree.cache.capacity + 8
        f.write((40 << 20) - 3, b"end")
    with ProtectedFile.open(host, key, "dir/file", "r") as f:
        assert f.read((40 << 20) - 10, 100) == bytes(7) + b"end"
        assert f.read(123_456_7, 10) == bytes(10)
