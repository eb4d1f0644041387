"""Fixtures for platform tests: private platform folders and real swtpm-backed platforms.

Every swtpm a test starts is stopped by a finalizer, also when the test fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cove.platform import monitor
from cove.platform.state import Paths
from cove.platform.swtpm import SwTpm
from tests.conftest import require


@pytest.fixture
def platform_paths(tmp_path, monkeypatch) -> Paths:
    """An empty platform folder, also set as COVE_PLATFORM_DIR for child processes."""
    directory = tmp_path / "platform"
    monkeypatch.setenv("COVE_PLATFORM_DIR", str(directory))
    return Paths(directory)


class TpmPlatforms:
    """Makes swtpm-backed platforms in folders of their own and stops them all at the end."""

    def __init__(self, base: Path):
        self.base = base
        self.made: list[Paths] = []

    def make(self, name: str = "tpm", **options) -> Paths:
        require("swtpm")
        require("swtpm_setup")
        require("tpm2_quote")
        paths = Paths(self.base / name)
        self.made.append(paths)
        monitor.init(monitor.InitOptions(tpm="swtpm", **options), paths)
        return paths

    def stop_all(self) -> None:
        for paths in self.made:
            SwTpm(paths.swtpm).stop()


@pytest.fixture
def tpm_platforms(tmp_path):
    platforms = TpmPlatforms(tmp_path)
    yield platforms
    platforms.stop_all()


def ek_root(paths: Paths) -> bytes:
    return SwTpm(paths.swtpm).ek_roots_pem()


def ak_root(paths: Paths) -> bytes:
    return (paths.local_ak_ca / "ca.pem").read_bytes()
