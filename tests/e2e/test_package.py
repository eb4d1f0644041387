"""cove package and cove run --package: a deployable archive, verified like an instance."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile

import pytest

from tests.conftest import error_line
from tests.e2e.helpers import make_instance


@pytest.fixture
def packaged(cove, probe, tmp_path):
    root = make_instance(cove, tmp_path, probe)
    out = tmp_path / "app.tar.gz"
    cove.ok("package", str(out), cwd=root)
    return root, out


def test_package_runs_elsewhere(cove, packaged, tmp_path):
    root, out = packaged
    expected = json.loads(cove.ok("inspect", "--json", cwd=root).stdout)
    shutil.rmtree(root)  # another machine has only the archive
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = cove("run", "--package", str(out), "/bin/probe", "exit", "5", cwd=elsewhere)
    assert result.returncode == 5, result.stderr
    inspected = json.loads(cove.ok("inspect", "--json", str(out), cwd=elsewhere).stdout)
    assert inspected == expected
    assert set(inspected) >= {"measurement", "signer", "product_id", "svn", "debug", "backend", "mounts"}


def test_package_is_deterministic(cove, packaged, tmp_path):
    root, out = packaged
    again = tmp_path / "again.tar.gz"
    cove.ok("package", str(again), cwd=root)
    assert gzip.decompress(out.read_bytes()) == gzip.decompress(again.read_bytes())


def rewrite(out, change):
    """Rewrite a package, passing each member's bytes through change(name, data)."""
    members = []
    with tarfile.open(out) as archive:
        for info in archive.getmembers():
            data = archive.extractfile(info).read() if info.isfile() else None
            members.append((info, data))
    with tarfile.open(out, "w:gz") as archive:
        for info, data in members:
            if data is not None:
                data = change(info.name, data)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(info)


def test_tampered_package_is_refused(cove, packaged):
    _, out = packaged

    def flip(name, data):
        if name == "image/bin/probe":
            data = bytearray(data)
            data[200] ^= 1
            return bytes(data)
        return data

    rewrite(out, flip)
    result = cove("run", "--package", str(out), "/bin/probe", "exit", "0")
    assert result.returncode == 3
    assert "bin/probe was modified" in error_line(result)


def test_package_with_an_escaping_member_is_refused(cove, tmp_path):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as archive:
        info = tarfile.TarInfo("../outside")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"x"))
    result = cove("run", "--package", str(evil), "/bin/sh")
    assert result.returncode == 2
    assert "not a valid Cove package" in error_line(result)
    assert not (tmp_path.parent / "outside").exists()


def test_not_a_package(cove, tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    result = cove("run", "--package", str(junk), "/bin/sh")
    assert result.returncode == 2
    assert "not a valid Cove package" in error_line(result)


def test_debug_enclave_needs_debug_to_package(cove, probe, tmp_path):
    root = make_instance(cove, tmp_path, probe, options={("enclave", "debug"): "true"})
    result = cove("package", str(tmp_path / "d.tar.gz"), cwd=root)
    assert result.returncode == 2
    assert "refusing to package a debug enclave" in error_line(result)
    assert not (tmp_path / "d.tar.gz").exists()
    cove.ok("package", "--debug", str(tmp_path / "d.tar.gz"), cwd=root)
    assert json.loads(cove.ok("inspect", "--json", str(tmp_path / "d.tar.gz")).stdout)["debug"] is True
