"""The image store: verified once, content-addressed, nothing partial, garbage collected."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cove.errors import CoveError, IntegrityError, NotFoundError
from cove.image.store import ImageStore
from tests.daemon.conftest import make_hello_instance


@pytest.fixture(scope="module")
def two(cove, hello, tmp_path_factory):
    """Two instances sharing the hello binary, the second with one more file."""
    parent = tmp_path_factory.mktemp("store-instances")
    first = make_hello_instance(cove, parent, hello, "first")
    cove.ok("new", "second", cwd=parent)
    second = parent / "second"
    cove.ok("add", "--to", "/bin", str(hello), cwd=second)
    (second / "image" / "extra.txt").write_text("only in the second image\n")
    cove.ok("build", cwd=second)
    return first, second


def test_import_once_and_share_files(two, tmp_path):
    store = ImageStore(tmp_path / "store")
    first, second = two
    image, new = store.import_instance(first)
    assert new and image.files >= 1
    again, new = store.import_instance(first)
    assert not new and again.id == image.id
    other, new = store.import_instance(second)
    assert new and other.id != image.id
    hello_a, hello_b = image.root / "bin" / "hello", other.root / "bin" / "hello"
    assert os.stat(hello_a).st_ino == os.stat(hello_b).st_ino  # stored once
    assert os.stat(hello_a).st_nlink == 3  # the blob and two trees
    assert oct(os.stat(tmp_path / "store").st_mode & 0o777) == "0o700"
    assert {i.id for i in store.list()} == {image.id, other.id}
    # the stored build is checked again at each use
    assert store.verified(image).measurement.hex() == image.measurement


def test_tampered_image_is_refused_and_leaves_nothing(two, tmp_path):
    first, _ = two
    copy = tmp_path / "tampered"
    shutil.copytree(first, copy, symlinks=True)
    hello = copy / "image" / "bin" / "hello"
    data = bytearray(hello.read_bytes())
    data[100] ^= 1
    hello.write_bytes(bytes(data))
    store = ImageStore(tmp_path / "store")
    with pytest.raises(IntegrityError, match="image changed since the build"):
        store.import_instance(copy)
    assert list(store.images.iterdir()) == [] and list(store.tmp.iterdir()) == []
    store.collect()
    assert list(store.blobs.iterdir()) == []


def test_forged_signature_and_wrong_signer(two, tmp_path):
    first, _ = two
    copy = tmp_path / "forged"
    shutil.copytree(first, copy, symlinks=True)
    signature = copy / "build" / "manifest.sig"
    data = bytearray(signature.read_bytes())
    data[-1] ^= 1
    signature.write_bytes(bytes(data))
    store = ImageStore(tmp_path / "store")
    with pytest.raises(CoveError):
        store.import_instance(copy)
    with pytest.raises(IntegrityError, match="not the expected signer"):
        store.import_instance(first, expected_signer=bytes(32))
    assert list(store.images.iterdir()) == []


def test_remove_and_collect(two, tmp_path):
    store = ImageStore(tmp_path / "store")
    first, second = two
    a, _ = store.import_instance(first)
    b, _ = store.import_instance(second)
    store.remove(b.id)
    blobs, freed = store.collect()
    assert blobs == 1 and freed == len("only in the second image\n")  # the shared hello stays
    assert (a.root / "bin" / "hello").exists()
    store.remove(a.id)
    blobs, freed = store.collect()
    assert blobs == 1 and list(store.blobs.iterdir()) == [] and store.size() == 0


def test_unreadable_file_is_not_imported_for_another_user(two, tmp_path):
    first, _ = two
    copy = tmp_path / "private"
    shutil.copytree(first, copy, symlinks=True)
    os.chmod(copy / "image" / "bin" / "hello", 0o700)  # root's only: a user may not have root read it
    store = ImageStore(tmp_path / "store")
    with pytest.raises(CoveError, match="not readable by uid 4242"):
        store.import_instance(copy, reader=4242)
    assert list(store.images.iterdir()) == []


@pytest.mark.parametrize("where", ["build", "path"])
def test_no_symbolic_link_is_followed_for_another_user(two, tmp_path, where):
    """A user's instance whose build folder (or a folder of its path) is a link elsewhere is refused: the
    daemon, root, must never read through it what the user could not have named as its own."""
    first, _ = two
    copy = tmp_path / "mine"
    shutil.copytree(first, copy, symlinks=True)
    for folder, dirs, files in os.walk(copy):
        for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            os.lchown(name, 4242, 4242)
    asked = copy
    if where == "build":
        shutil.rmtree(copy / "build")
        (copy / "build").symlink_to(first / "build")
        os.lchown(copy / "build", 4242, 4242)
    else:
        (tmp_path / "via").symlink_to(tmp_path)
        asked = tmp_path / "via" / "mine"
    store = ImageStore(tmp_path / "store")
    with pytest.raises(NotFoundError, match="a symbolic link is not followed"):
        store.import_instance(asked, reader=4242)
    assert list(store.images.iterdir()) == []
    assert store.import_instance(copy, reader=4242)[1] if where == "path" else True  # the real path is fine


def test_import_killed_midway_leaves_nothing(cove, tmp_path):
    """kill -9 of an import of a large image: no image, and the next collection removes its leftovers."""
    cove.ok("new", "big", cwd=tmp_path)
    big = tmp_path / "big"
    with open(big / "image" / "blob.bin", "wb") as handle:
        for _ in range(64):
            handle.write(os.urandom(1 << 20))
    cove.ok("build", cwd=big)
    code = "import sys; from cove.image.store import ImageStore; ImageStore(sys.argv[1]).import_instance(sys.argv[2])"
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "store"), str(big)])
    store_tmp = tmp_path / "store" / "tmp"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(store_tmp.glob(".blob-*")):
        time.sleep(0.002)
    child.send_signal(signal.SIGKILL)
    child.wait()
    store = ImageStore(tmp_path / "store")
    assert list(store.images.iterdir()) == []
    assert list(store.tmp.iterdir())  # the cut-short import is visible only under tmp/
    store.collect()
    assert list(store.tmp.iterdir()) == [] and list(store.blobs.iterdir()) == []
    image, new = store.import_instance(big)  # and the next import completes
    assert new and image.bytes == 64 << 20


def test_disk_full_during_import(two, tmp_path):
    """ENOSPC on the store's disk: an OSError, and nothing partial."""
    first, _ = two
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    try:
        store = ImageStore(mount / "store")
        with pytest.raises(OSError) as raised:
            store.import_instance(first)
        assert raised.value.errno == 28
        assert list(store.images.iterdir()) == [] and list(store.tmp.iterdir()) == []
        store.collect()
        assert list(store.blobs.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
