"""An image's record in the node's store (images/ID/image.json) is read through cove.decode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cove.errors import CoveError
from cove.image.store import ImageStore

IDENT = "ab" * 32 + "cd" * 8
RECORD = {"name": "hello", "measurement": "ab" * 32, "signer": "cd" * 32, "files": 3, "bytes": 4096, "imported": 1.5}
HOSTILE = {
    "deep nesting": (b"[" * 10_000 + b"]" * 10_000, "not valid JSON"),  # was a RecursionError
    "trailing garbage": (json.dumps(RECORD).encode() + b" {}", "not valid JSON"),
    "wrong top-level type": (json.dumps([RECORD]).encode(), "must be a map"),
    "wrong field type": (json.dumps(dict(RECORD, files="3")).encode(), "files must be an integer"),  # was accepted
    "missing field": (json.dumps({k: v for k, v in RECORD.items() if k != "signer"}).encode(), "lacks signer"),
    "not UTF-8": (b"\xff\xfe{}", "not valid JSON"),
}


def _store(tmp_path: Path, record: bytes) -> ImageStore:
    store = ImageStore(tmp_path / "store")
    (store.images / IDENT).mkdir()
    (store.images / IDENT / "image.json").write_bytes(record)
    return store


def test_a_good_record_reads_back(tmp_path: Path) -> None:
    store = _store(tmp_path, json.dumps(RECORD).encode())
    image = store.get(IDENT)
    assert (image.name, image.files, image.bytes, image.imported) == ("hello", 3, 4096, 1.5)
    assert [i.id for i in store.list()] == [IDENT]


@pytest.mark.parametrize("case", HOSTILE)
def test_a_damaged_record_is_one_error_and_not_listed(tmp_path: Path, case: str) -> None:
    record, words = HOSTILE[case]
    store = _store(tmp_path, record)
    with pytest.raises(CoveError, match=words) as caught:
        store.get(IDENT)
    assert f"images/{IDENT}/image.json" in str(caught.value) and "\n" not in str(caught.value)
    assert store.list() == []
