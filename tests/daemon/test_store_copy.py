"""The store's copy of an image file: made in the kernel where it can be, hashed from the store's own copy."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest

from cove.errors import IntegrityError
from cove.image import store as store_module
from cove.image.store import ImageStore

# sizes around the copy's step: one step, one byte past it (a second, tiny step), several steps unaligned
SIZES = (store_module.COPY_STEP - 1, store_module.COPY_STEP + 1, 2 * store_module.COPY_STEP + 4097)


@pytest.fixture(scope="module")
def large(cove, tmp_path_factory):
    """An instance with files of SIZES bytes (and an empty one): each crosses a step boundary differently."""
    parent = tmp_path_factory.mktemp("store-copy")
    cove.ok("new", "large", cwd=parent)
    root = parent / "large"
    for size in SIZES:
        (root / "image" / f"f{size}.bin").write_bytes(os.urandom(size))
    (root / "image" / "empty").write_bytes(b"")
    cove.ok("build", cwd=root)
    return root


@pytest.fixture
def on_tmpfs(tmp_path):
    """A folder on another file system than the store's: the kernel does not copy across (EXDEV)."""
    mount = tmp_path / "other-fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.parametrize("where", ["same-fs", "other-fs"])
def test_large_files_are_stored_whole_and_named_by_their_hash(large, tmp_path, where, request):
    instance = large
    if where == "other-fs":
        instance = request.getfixturevalue("on_tmpfs") / "large"
        shutil.copytree(large, instance, symlinks=True)
    store = ImageStore(tmp_path / "store")
    image, new = store.import_instance(instance)
    assert new and image.files == len(SIZES) + 1
    for size in SIZES:
        data = (large / "image" / f"f{size}.bin").read_bytes()
        stored = image.root / f"f{size}.bin"
        assert stored.read_bytes() == data
        blob = store.blobs / f"{hashlib.sha256(data).hexdigest()}-0644"
        assert os.stat(blob).st_ino == os.stat(stored).st_ino
    assert (image.root / "empty").read_bytes() == b""
    assert list(store.tmp.iterdir()) == []


def test_a_large_file_changed_after_the_build_is_refused(large, tmp_path):
    """A flipped byte past the first step (hashed by the second thread) is caught like any other."""
    copy = tmp_path / "changed"
    shutil.copytree(large, copy, symlinks=True)
    size = SIZES[-1]
    with open(copy / "image" / f"f{size}.bin", "r+b") as handle:
        handle.seek(size - 10)
        byte = handle.read(1)
        handle.seek(size - 10)
        handle.write(bytes([byte[0] ^ 1]))
    store = ImageStore(tmp_path / "store")
    with pytest.raises(IntegrityError, match="image changed since the build"):
        store.import_instance(copy)
    assert list(store.images.iterdir()) == [] and list(store.tmp.iterdir()) == []
    store.collect()
    assert list(store.blobs.iterdir()) == []


def test_an_image_is_published_only_after_its_record_is_on_disk(large, tmp_path, monkeypatch):
    """The order a machine crash relies on: each blob and image.json fsynced before the rename that publishes
    the image, and images/ fsynced after it (a crash then never leaves an image whose record is empty)."""
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(source, target) -> None:
        events.append(("rename", str(target)))
        real_rename(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    store = ImageStore(tmp_path / "store")
    image, _ = store.import_instance(large)
    published = events.index(("rename", str(store.images / image.id)))
    before, after = events[:published], events[published + 1 :]
    assert any(kind == "fsync" and path.endswith("/image.json") for kind, path in before)
    assert sum(1 for kind, path in before if kind == "rename" and "/blobs/sha256/" in path) == len(SIZES) + 1
    for kind, path in before:
        if kind == "rename" and "/blobs/sha256/" in path:
            assert before[before.index((kind, path)) - 1][0] == "fsync"  # each blob's content first
    assert ("fsync", str(store.images)) in after
