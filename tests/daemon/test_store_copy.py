"""The store's copy of an image file: made in the kernel where it can be, hashed from the store's own copy."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

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


def test_an_image_is_published_only_after_its_content_is_on_disk(large, tmp_path, monkeypatch):
    """The order a machine crash relies on: every new blob fsynced before it is renamed into blobs/,
    image.json fsynced before the rename that publishes the image, and images/ fsynced after it."""
    events: list[tuple[str, str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))  # (from the pool's threads too)

    def rename(source, target) -> None:
        events.append(("rename", str(source), str(target)))
        real_rename(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    store = ImageStore(tmp_path / "store")
    image, _ = store.import_instance(large)
    published = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(store.images / image.id))
    before, after = events[:published], events[published + 1 :]
    blob_renames = [(i, e) for i, e in enumerate(before) if e[0] == "rename" and "/blobs/sha256/" in e[2]]
    assert len(blob_renames) == len(SIZES) + 1
    for i, (_, source, _) in blob_renames:
        assert ("fsync", source, "") in before[:i]  # its content on disk before its name
    assert any(kind == "fsync" and path.endswith("/image.json") for kind, path, _ in before)
    assert ("fsync", str(store.images), "") in after


MANY = 400


@pytest.fixture(scope="module")
def many_files(cove, tmp_path_factory):
    """An image of MANY small files, a few of them the same content (stored once)."""
    parent = tmp_path_factory.mktemp("store-many")
    cove.ok("new", "many", cwd=parent)
    root = parent / "many"
    for i in range(MANY):
        folder = root / "image" / f"d{i % 10}"
        folder.mkdir(exist_ok=True)
        (folder / f"f{i}").write_bytes(b"same content\n" if i % 50 == 0 else os.urandom(2048))
    cove.ok("build", cwd=root)
    return root


def test_many_files_are_stored_once_each(many_files, tmp_path):
    store = ImageStore(tmp_path / "store")
    image, new = store.import_instance(many_files)
    assert new and image.files == MANY
    same = [image.root / f"d{i % 10}" / f"f{i}" for i in range(0, MANY, 50)]
    assert len({os.stat(path).st_ino for path in same}) == 1  # one blob for the repeated content
    assert len(list(store.blobs.iterdir())) == MANY - len(same) + 1
    assert list(store.tmp.iterdir()) == []
    for i in range(MANY):
        relative = f"d{i % 10}/f{i}"
        assert (image.root / relative).read_bytes() == (many_files / "image" / relative).read_bytes()


@pytest.mark.parametrize("after_ms", [100, 350, 650])
def test_kill_9_at_any_moment_leaves_nothing_that_looks_complete(many_files, tmp_path, after_ms):
    """kill -9 of an import of many files after a while: images/ holds the whole image or nothing, no blob in
    blobs/ lacks content, and a collection leaves only what a whole image links."""
    code = "import sys; from cove.image.store import ImageStore; ImageStore(sys.argv[1]).import_instance(sys.argv[2])"
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "store"), str(many_files)])
    time.sleep(after_ms / 1000)
    child.send_signal(signal.SIGKILL)
    child.wait()
    store = ImageStore(tmp_path / "store")
    for blob in store.blobs.iterdir():  # named by its content's hash, whatever the moment
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name.split("-")[0]
    images = store.list()
    for image in images:
        assert image.files == MANY
        for i in range(MANY):
            relative = f"d{i % 10}/f{i}"
            assert (image.root / relative).read_bytes() == (many_files / "image" / relative).read_bytes()
    store.collect()
    assert list(store.tmp.iterdir()) == []
    assert all(os.stat(blob).st_nlink >= 2 for blob in store.blobs.iterdir())  # each linked by the image's tree
    if not images:
        assert list(store.blobs.iterdir()) == []
    image, _ = store.import_instance(many_files)  # and an import completes after it
    assert image.files == MANY
