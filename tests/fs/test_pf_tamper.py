"""Any change to a protected file at rest is refused with a FileIntegrityError.

Not detectable at the file level, by design: replacing the file with an older
version of itself (its root MAC must be checked by the volume layer, see
``expected_root_mac``), and appending whole nodes past the end (they cannot
change what the file reads; see test_whole_node_extension_is_inert).
"""

from __future__ import annotations

import os
import random
import shutil

import pytest

from cove.errors import CoveError, IntegrityError
from cove.fs import FileIntegrityError, ProtectedFile
from cove.fs.layout import NODE_SIZE, data_phys, mht_phys

from pf_helpers import host, key, make_file, read_all  # noqa: F401 (fixtures)

SIZE = 3072 + 130 * 4096 + 1000  # metadata, root MHT, MHT node 1, 131 data nodes


@pytest.fixture
def sample(host, key):
    data = os.urandom(SIZE)
    make_file(host, key, data)
    return host, key, data


def flip(path: str, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def expect_error(path, key, logical="dir/file", match=None) -> FileIntegrityError:
    with pytest.raises(FileIntegrityError, match=match) as info:
        read_all(path, key, logical)
    assert isinstance(info.value, IntegrityError) and isinstance(info.value, CoveError)
    return info.value


def test_error_type_is_a_cove_error():
    assert issubclass(FileIntegrityError, IntegrityError)
    assert issubclass(FileIntegrityError, CoveError)


def test_untampered_sample_reads(sample):
    path, key, data = sample
    assert read_all(path, key) == data


def test_every_metadata_byte_flipped_is_detected(sample):
    path, key, _ = sample
    for offset in range(NODE_SIZE):
        for mask in (0x01, 0x80):
            flip(path, offset, mask)
            with pytest.raises(FileIntegrityError):
                read_all(path, key)
            flip(path, offset, mask)
    assert read_all(path, key) == sample[2]


@pytest.mark.parametrize(
    "offset,match",
    [
        (0, "bad magic"),
        (8, "version"),
        (20, "metadata MAC mismatch"),
        (50, "metadata MAC mismatch"),
        (58, "recovery file is missing"),
        (1000, "metadata MAC mismatch"),
        (4000, "padding"),
    ],
)
def test_metadata_messages_name_the_failure(sample, offset, match):
    path, key, _ = sample
    flip(path, offset)
    expect_error(path, key, match=match)


def test_data_and_mht_nodes_flipped_are_detected(sample):
    path, key, _ = sample
    rng = random.Random(7)
    phys_nodes = [1, mht_phys(1), data_phys(0), data_phys(95), data_phys(96), data_phys(130)]
    phys_nodes += rng.sample(range(2, os.path.getsize(path) // NODE_SIZE), 10)
    for phys in phys_nodes:
        for within in (0, rng.randrange(NODE_SIZE), NODE_SIZE - 1):
            offset = phys * NODE_SIZE + within
            flip(path, offset)
            err = expect_error(path, key)
            assert "MAC mismatch" in err.message and f"node {phys}" in err.message
            flip(path, offset)


def test_message_names_data_node(sample):
    path, key, _ = sample
    flip(path, data_phys(5) * NODE_SIZE + 10)
    expect_error(path, key, match=r"data node 5 \(node 7\) MAC mismatch")


def test_truncation_is_detected(sample):
    path, key, _ = sample
    full = os.path.getsize(path)
    for new_size in (full - NODE_SIZE, full - 1, NODE_SIZE, 100, 0):
        shutil.copy(path, path + ".orig")
        os.truncate(path, new_size)
        expect_error(path, key, match="truncated|multiple")
        shutil.move(path + ".orig", path)


def test_partial_extension_is_detected(sample):
    path, key, _ = sample
    with open(path, "ab") as f:
        f.write(b"\0")
    expect_error(path, key, match="not a multiple")


def test_whole_node_extension_is_inert(sample):
    """Extra whole nodes past the end cannot change content or size.

    They are indistinguishable from the tail a crash can leave between a
    commit that shrank the file and the trim that follows it, so they are
    ignored on read and trimmed by the next commit.
    """
    path, key, data = sample
    size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(os.urandom(3 * NODE_SIZE))
    assert read_all(path, key) == data
    with ProtectedFile.open(path, key, "dir/file", "r+") as f:
        f.write(0, b"x")
    assert os.path.getsize(path) == size


def test_swapped_data_nodes_are_detected(sample):
    path, key, _ = sample
    a, b = data_phys(3) * NODE_SIZE, data_phys(40) * NODE_SIZE
    with open(path, "r+b") as f:
        f.seek(a)
        na = f.read(NODE_SIZE)
        f.seek(b)
        nb = f.read(NODE_SIZE)
        f.seek(a)
        f.write(nb)
        f.seek(b)
        f.write(na)
    expect_error(path, key, match="MAC mismatch")


def test_swapped_mht_and_data_node_are_detected(sample):
    path, key, _ = sample
    a, b = mht_phys(1) * NODE_SIZE, data_phys(100) * NODE_SIZE
    with open(path, "r+b") as f:
        f.seek(a)
        na = f.read(NODE_SIZE)
        f.seek(b)
        nb = f.read(NODE_SIZE)
        f.seek(a)
        f.write(nb)
        f.seek(b)
        f.write(na)
    expect_error(path, key, match="MAC mismatch")


def test_node_from_another_file_is_detected(sample, tmp_path):
    path, key, _ = sample
    other = str(tmp_path / "other.pf")
    make_file(other, key, os.urandom(SIZE))
    with open(other, "rb") as f:
        f.seek(data_phys(9) * NODE_SIZE)
        foreign = f.read(NODE_SIZE)
    with open(path, "r+b") as f:
        f.seek(data_phys(9) * NODE_SIZE)
        f.write(foreign)
    expect_error(path, key, match="data node 9")


def test_copy_to_another_path_is_a_path_mismatch(sample, tmp_path):
    path, key, _ = sample
    copy = str(tmp_path / "copy.pf")
    shutil.copy(path, copy)
    err = expect_error(copy, key, logical="dir/other")
    assert err.message == "path mismatch: file bound to 'dir/file', opened as 'dir/other'"


def test_wrong_key_fails(sample):
    path, _, _ = sample
    err = expect_error(path, os.urandom(16))
    assert "metadata MAC mismatch" in err.message and "wrong key" in err.message


def test_older_version_is_not_detected_at_file_level(sample, tmp_path):
    """Rollback to an older, authentic version passes the file's own checks.

    This is the volume layer's job: it records root_mac() and passes it back as
    expected_root_mac, which does catch the rollback.
    """
    path, key, data = sample
    old = str(tmp_path / "old.pf")
    shutil.copy(path, old)
    with ProtectedFile.open(path, key, "dir/file", "r+") as f:
        f.write(100, b"new content")
        new_mac = f.root_mac()
    shutil.copy(old, path)
    assert read_all(path, key) == data  # accepted: the file alone cannot know
    with pytest.raises(FileIntegrityError, match="root MAC mismatch"):
        ProtectedFile.open(path, key, "dir/file", "r", expected_root_mac=new_mac)


def test_handle_is_poisoned_after_a_failure(sample):
    path, key, _ = sample
    flip(path, data_phys(50) * NODE_SIZE)
    with ProtectedFile.open(path, key, "dir/file", "r") as f:
        assert len(f.read(0, 4096)) == 4096
        with pytest.raises(FileIntegrityError):
            f.read(0, SIZE)
        with pytest.raises(FileIntegrityError, match="earlier check"):
            f.read(0, 10)


def test_forged_recovery_file_cannot_inject_content(sample):
    """A recovery file is untrusted: what it restores still has to verify."""
    path, key, _ = sample
    flip(path, 58)  # set has-pending-write
    rec = os.urandom(8)  # garbage record header
    with open(path + ".gramine.recovery", "wb") as f:
        f.write((5).to_bytes(8, "little") + os.urandom(NODE_SIZE) + rec)
    with pytest.raises(FileIntegrityError):
        read_all(path, key)
