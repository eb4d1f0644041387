"""What `cove fs` does on a volume beyond parsing and printing (fs.volume_tools), on a real volume."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cove.errors import CoveError
from cove.fs import volume_tools
from cove.fs.access import open_volume

KEY = "insecure:" + "11" * 16


@pytest.fixture(autouse=True)
def platform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COVE_PLATFORM_DIR", str(tmp_path / "platform"))


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    with open_volume(str(tmp_path / "vol"), KEY, None, label="/v", create=True, anchor="file") as vol:
        vol.makedirs("/d")
        vol.write_file("/d/a", b"abc")
        vol.write_file("/b", b"hello")
        vol.symlink(vol.root, b"l", b"d/a")
        vol.commit()
    return tmp_path / "vol"


def test_listing_verify_and_size(volume: Path) -> None:
    with volume_tools.open_checked(volume, KEY, None) as vol:
        assert [(e.path, stat.S_ISDIR(e.mode), e.size, e.target) for e in volume_tools.listing(vol)] == [
            ("/b", False, 5, None),
            ("/d", True, 4096, None),
            ("/d/a", False, 3, None),
            ("/l", False, 3, "d/a"),
        ]
        assert [e.path for e in volume_tools.listing(vol, "/d/")] == ["/d/a"]
        assert [e.path for e in volume_tools.listing(vol, "/b")] == ["/b"]
        with pytest.raises(CoveError, match="/nope: not in the volume"):
            volume_tools.listing(vol, "/nope")
        assert volume_tools.content_size(vol) == 8
        found = volume_tools.verify(vol)
        assert (found.problems, found.files, found.size, found.label) == ([], 2, 8, "/v")


def test_refusals_name_the_path(volume: Path, tmp_path: Path) -> None:
    with pytest.raises(CoveError, match="no such file or folder"):
        volume_tools.require_input(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CoveError, match="is not a Cove volume"):
        volume_tools.open_checked(tmp_path / "plain", KEY, None)
    with pytest.raises(CoveError, match="still holds a volume"):
        volume_tools.forget(volume)
    with pytest.raises(CoveError, match="no record of a volume"):
        volume_tools.forget(tmp_path / "plain")
    assert volume_tools.host_size(tmp_path / "plain") == 0


def test_forget_drops_the_records_of_a_deleted_volume(volume: Path) -> None:
    import shutil

    shutil.rmtree(volume)
    assert len(volume_tools.forget(volume)) == 1
    with pytest.raises(CoveError, match="no record of a volume"):
        volume_tools.forget(volume)
