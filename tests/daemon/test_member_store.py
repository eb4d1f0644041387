"""The store's record of who uses each image (image.json "users"), and an import that stops at the first
file the signed listing does not match."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from cove.errors import CoveError, IntegrityError, NotFoundError
from cove.image.store import ImageStore
from tests.conftest import raised_at_once
from tests.daemon.conftest import make_hello_instance

MEMBER, OTHER = 4243, 4244


@pytest.fixture(scope="module")
def built(cove, hello, tmp_path_factory):
    """An instance whose image holds a.txt and z.txt besides the hello binary."""
    parent = tmp_path_factory.mktemp("claims")
    instance = make_hello_instance(cove, parent, hello, "claims")
    (instance / "image" / "a.txt").write_text("first\n")
    (instance / "image" / "z.txt").write_text("last\n")
    for folder, _, _ in os.walk(instance / "image"):  # readable by the member too
        os.chmod(folder, 0o755)
    cove.ok("build", cwd=instance)
    return instance


def test_users_are_recorded_released_and_the_last_claim_removes(built, tmp_path):
    store = ImageStore(tmp_path / "store")
    image, new = store.import_instance(built, reader=MEMBER)
    assert new and image.users == (MEMBER,)
    assert store.import_instance(built)[0].users == (MEMBER, 0)  # root's run of the stored image claims it too
    assert store.claim(image.id, OTHER).users == (MEMBER, 0, OTHER)
    assert store.claim(image.id, OTHER).users == (MEMBER, 0, OTHER)  # once
    assert store.release(image.id, 0)[1] is False
    assert store.get(image.id).users == (MEMBER, OTHER)
    assert store.release(image.id, MEMBER, keep=True)[1] is False  # kept: another's enclave still names it
    assert store.get(image.id).users == (OTHER,)
    assert store.release(image.id, OTHER, keep=True)[1] is False  # the last claim, kept: root's, as an old record
    assert store.get(image.id).users == (0,)
    assert store.claim(image.id, OTHER).users == (0, OTHER)
    assert store.release(image.id, 0)[1] is False
    assert store.release(image.id, OTHER)[1] is True
    assert store.list() == [] and list(store.tmp.iterdir()) == []
    with pytest.raises(NotFoundError):
        store.claim(image.id, MEMBER)


def test_a_record_without_users_is_roots_and_a_damaged_one_is_not_listed(built, tmp_path):
    store = ImageStore(tmp_path / "store")
    image, _ = store.import_instance(built)
    record = store.images / image.id / "image.json"
    old = json.loads(record.read_text())
    del old["users"]  # as a store written before the record existed
    record.write_text(json.dumps(old))
    assert store.get(image.id).users == (0,)
    for users in ([], ["0"], [-1], [True], [2**32], "0", [0] * 70000):
        record.write_text(json.dumps(dict(old, users=users)))
        with pytest.raises(CoveError, match="users"):
            store.get(image.id)
        assert store.list() == []


def test_an_import_stops_at_the_first_file_the_listing_does_not_match(built, tmp_path):
    """a.txt changed and z.txt made a fifo: the import names a.txt, never reaching z.txt (before, it copied
    the whole tree and stopped at the fifo)."""
    copy = tmp_path / "changed"
    shutil.copytree(built, copy, symlinks=True)
    (copy / "image" / "a.txt").write_text("FIRST\n")  # the same size, another digest
    store = ImageStore(tmp_path / "store")
    with pytest.raises(IntegrityError, match="a.txt was modified"):
        store.import_instance(copy)
    (copy / "image" / "a.txt").write_text("first, and longer\n")  # another size: refused before it is copied
    (copy / "image" / "z.txt").unlink()
    os.mkfifo(copy / "image" / "z.txt")
    with pytest.raises(IntegrityError, match="a.txt was modified"):
        store.import_instance(copy)
    assert store.list() == [] and list(store.tmp.iterdir()) == []
    store.collect()
    assert list(store.blobs.iterdir()) == []


def test_an_encrypted_builds_key_file_is_never_read_by_the_import(built, tmp_path):
    """The store refuses an --encrypt-image build by looking at build/image.enc alone: the key file, a
    user's to make, could be a FIFO (the import, holding the store's lock, would wait for ever) or a link
    to any file (root would read it)."""
    copy = tmp_path / "enc"
    shutil.copytree(built, copy, symlinks=True)
    (copy / "build" / "image.enc").mkdir()
    os.mkfifo(copy / "build" / "image.key")
    store = ImageStore(tmp_path / "store")
    raised = raised_at_once(lambda: store.import_instance(copy, reader=MEMBER), 30)
    assert isinstance(raised, CoveError) and "--encrypt-image is not stored by the node" in str(raised), raised
    assert store.list() == [] and list(store.tmp.iterdir()) == []
