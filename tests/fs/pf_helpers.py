"""Shared helpers for the protected-file tests."""

from __future__ import annotations

import os

import pytest  # noqa: F401

from cove.fs import ProtectedFile

KEY = bytes.fromhex("000102030405060708090a0b0c0d0e0f")


@pytest.fixture
def key() -> bytes:
    return os.urandom(16)


@pytest.fixture
def host(tmp_path) -> str:
    return str(tmp_path / "file.pf")


def make_file(path: str, key: bytes, content: bytes, logical: str = "dir/file", **kw) -> bytes:
    """Create a protected file holding ``content``; return its root MAC."""
    with ProtectedFile.open(path, key, logical, "w", **kw) as f:
        f.write(0, content)
        return f.root_mac()


def read_all(path: str, key: bytes, logical: str = "dir/file", **kw) -> bytes:
    with ProtectedFile.open(path, key, logical, "r", **kw) as f:
        data = f.read(0, f.size() + 1)
        assert len(data) == f.size()
        return data
