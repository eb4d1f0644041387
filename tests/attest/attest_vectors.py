"""Where the attestation test vectors live, and how tests read them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

VECTORS = Path(__file__).resolve().parent.parent / "data" / "vectors"


def vector(rel: str) -> bytes:
    """The bytes of one vector file; a missing file fails the test loudly."""
    path = VECTORS / rel
    assert path.is_file(), f"missing test vector {rel}: restore tests/data/vectors from the repository"
    return path.read_bytes()


def collateral(rel: str) -> dict:
    return json.loads(vector(rel))


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    return VECTORS
