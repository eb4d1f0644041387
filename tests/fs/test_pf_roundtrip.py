"""Content written through the format reads back identically, at every boundary."""

from __future__ import annotations

import os

import pytest

from cove.fs import ProtectedFile
from cove.fs.layout import NODE_SIZE, node_count

from pf_helpers import host, key, make_file, read_all  # noqa: F401 (fixtures)

SIZES = [
    0,
    1,
    2,
    15,
    16,
    17,
    255,
    256,
    257,
    1023,
    1024,
    1025,
    4095,
    4096,
    4097,
    65535,
    65536,
    65537,
    1048575,
    1048576,
    1048577,
]


@pytest.mark.parametrize("size", SIZES)
def test_round_trip(host, key, size):
    data = os.urandom(size)
    make_file(host, key, data)
    assert read_all(host, key) == data
    assert os.path.getsize(host) == node_count(size) * NODE_SIZE


@pytest.mark.parametrize("size", [3071, 3072, 3073, 3072 + 96 * 4096, 3072 + 96 * 4096 + 1, 3072 + 33 * 96 * 4096 + 5])
def test_round_trip_at_tree_boundaries(host, key, size):
    """Metadata-only, first data node, first non-root MHT node, second MHT level."""
    data = os.urandom(size)
    make_file(host, key, data, cache_bytes=64 << 10)
    assert read_all(host, key, cache_bytes=64 << 10) == data


def test_chunked_writes_and_reads_with_tiny_cache(host, key):
    data = os.urandom(700_001)
    with ProtectedFile.open(host, key, "dir/file", "w", cache_bytes=32 << 10) as f:
        for off in range(0, len(data), 777):
            f.write(off, data[off : off + 777])
    with ProtectedFile.open(host, key, "dir/file", "r", cache_bytes=32 << 10) as f:
        got = b"".join(f.read(off, 4099) for off in range(0, len(data), 4099))
    assert got == data


def test_hole_reads_zero(host, key):
    with ProtectedFile.open(host, key, "dir/file", "w") as f:
        f.write(10, b"a")
        f.write(500_000, b"b")
        assert f.size() == 500_001
    data = read_all(host, key)
    assert data[:10] == bytes(10) and data[10:11] == b"a"
    assert data[11:500_000] == bytes(500_000 - 11) and data[-1:] == b"b"


def test_truncate_then_extend_reads_zeros(host, key):
    with ProtectedFile.open(host, key, "dir/file", "w") as f:
        f.write(0, b"\xff" * 20_000)
        f.flush()
        f.truncate(5)
        f.truncate(20_000)
        assert f.read(0, 20_000) == b"\xff" * 5 + bytes(19_995)
    assert read_all(host, key) == b"\xff" * 5 + bytes(19_995)
    with ProtectedFile.open(host, key, "dir/file", "r+") as f:
        f.truncate(1000)
        f.close()
        f.close()
    with ProtectedFile.open(host, key, "dir/file", "r+") as f:
        f.truncate(9000)  # the committed shrink left old bytes in the node: must read zeros
        assert f.read(0, 9000) == b"\xff" * 5 + bytes(8995)
