"""The daemon's memory of imported builds: reused only while every file an import reads is unchanged."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path

import pytest

from cove.errors import CoveError
from cove.image.store import ImageStore, StoredImage
from cove.daemon.imports import ImportCache
from tests.daemon.conftest import make_hello_instance


class CountingStore(ImageStore):
    """The real store, counting the imports that reach it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.imports = 0

    def import_instance(
        self, instance: Path, expected_signer: bytes | None = None, reader: int | None = None
    ) -> tuple[StoredImage, bool]:
        self.imports += 1
        return super().import_instance(instance, expected_signer, reader)


@pytest.fixture
def setup(cove, hello, tmp_path):
    instance = make_hello_instance(cove, tmp_path, hello, "cached")
    store = CountingStore(tmp_path / "store")
    return instance, store, ImportCache(store)


def test_an_unchanged_build_is_imported_once(setup):
    instance, store, cache = setup
    image, new = cache.import_instance(instance)
    assert new and store.imports == 1
    for _ in range(3):
        again, new = cache.import_instance(instance)
        assert (again.id, new, store.imports) == (image.id, False, 1)
    assert cache.verified(image) is cache.verified(again)
    # another user asking: its own import, and its checks even though the image is stored (the image's
    # /root is root's alone: that user could not read it, so the daemon does not run it for that user)
    with pytest.raises(CoveError, match="image/root is not readable by uid 4242"):
        cache.import_instance(instance, reader=4242)
    assert store.imports == 2


@pytest.mark.parametrize(
    "change", ["rewrite cove.toml", "touch manifest", "replace signature", "add image.enc", "other signer"]
)
def test_any_change_imports_again(setup, change):
    instance, store, cache = setup
    cache.import_instance(instance)
    signer = None
    if change == "rewrite cove.toml":  # the same bytes: only the change time differs
        (instance / "cove.toml").write_bytes((instance / "cove.toml").read_bytes())
    elif change == "touch manifest":
        os.utime(instance / "build" / "manifest.cbor")
    elif change == "replace signature":
        copy = instance / "build" / "signature.tmp"
        shutil.copy2(instance / "build" / "manifest.sig", copy)
        os.replace(copy, instance / "build" / "manifest.sig")
    elif change == "add image.enc":
        (instance / "build" / "image.enc").mkdir()
    else:
        signer = b"\x01" * 32
    try:
        cache.import_instance(instance, signer)
    except CoveError:
        pass  # a refused import (another signer, an encrypted build) is refused again, never served from memory
    assert store.imports == 2


def test_a_tampered_build_is_refused_after_a_cached_run(setup):
    instance, store, cache = setup
    cache.import_instance(instance)
    manifest = instance / "build" / "manifest.cbor"
    data = bytearray(manifest.read_bytes())
    data[-1] ^= 1
    manifest.write_bytes(bytes(data))
    with pytest.raises(CoveError):
        cache.import_instance(instance)
    with pytest.raises(CoveError):  # and again: a failed import is never remembered
        cache.import_instance(instance)
    assert store.imports == 3


def test_a_removed_image_is_imported_again(setup):
    instance, store, cache = setup
    image, _ = cache.import_instance(instance)
    store.remove(image.id)  # behind the cache's back
    again, new = cache.import_instance(instance)
    assert new and again.id == image.id and store.imports == 2
    store.remove(image.id)
    cache.forget(image.id)
    assert cache.import_instance(instance)[1] and store.imports == 3


def test_request_threads_share_the_cache(setup):
    """Runs and an rmi at once, as the daemon's request threads do: never a KeyError (a 500) from the cache."""
    instance, store, cache = setup
    image, _ = cache.import_instance(instance)
    errors: list[BaseException] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                found, _ = cache.import_instance(instance)
                cache.verified(found)
            except (FileNotFoundError, CoveError):
                continue  # the image went between the import and the check: a problem document, not a 500
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)
                return

    def rmi() -> None:
        while not stop.is_set():
            try:
                store.remove(image.id)
            except (CoveError, OSError):
                pass
            cache.forget(image.id)

    threads = [threading.Thread(target=run) for _ in range(4)] + [threading.Thread(target=rmi)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for thread in threads:
            thread.start()
        stop.wait(3)
        stop.set()
        for thread in threads:
            thread.join(30)
    finally:
        sys.setswitchinterval(switch)
    assert not errors, errors[:3]
