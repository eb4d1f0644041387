"""The measurement depends on content only, and the build cache is never trusted at run time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import cbor2

from tests.e2e.helpers import make_instance


def measurement(cove, root) -> str:
    return json.loads(cove.ok("inspect", "--json", cwd=root).stdout)["measurement"]


def test_same_content_same_measurement_anywhere(cove, probe, tmp_path):
    (tmp_path / "a").mkdir()
    first = make_instance(cove, tmp_path / "a", probe)
    second_parent = tmp_path / "elsewhere" / "deeper"
    second_parent.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(first), str(second_parent / "app")], check=True)
    second = second_parent / "app"
    shutil.rmtree(second / "build")
    (second / "build").mkdir()
    # different owners and mtimes for every path of the copy
    for dirpath, dirnames, filenames in os.walk(second / "image"):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            os.lchown(path, 1234, 5678)
            os.utime(path, (1_000_000, 2_000_000), follow_symlinks=False)
    cove.ok("build", cwd=second)
    assert measurement(cove, first) == measurement(cove, second)
    assert (first / "build" / "manifest.cbor").read_bytes() == (second / "build" / "manifest.cbor").read_bytes()


def test_content_changes_the_measurement(cove, probe, tmp_path):
    root = make_instance(cove, tmp_path, probe)
    before = measurement(cove, root)
    (root / "image" / "etc" / "motd").write_text("hello")
    cove.ok("build", cwd=root)
    assert measurement(cove, root) != before


def test_rebuild_skips_unchanged_files(cove, probe, tmp_path):
    root = make_instance(cove, tmp_path, probe)
    out = cove.ok("build", cwd=root).stdout
    assert "(0 hashed," in out
    (root / "image" / "etc" / "motd").write_text("hello")
    out = cove.ok("build", cwd=root).stdout
    assert "(1 hashed," in out


def test_a_poisoned_build_cache_is_caught_at_run_time(cove, probe, tmp_path):
    root = make_instance(cove, tmp_path, probe)
    cache_path = root / "build" / "hash-cache.cbor"
    cache = cbor2.loads(cache_path.read_bytes())
    target = root / "image" / "bin" / "probe"
    st = target.stat()
    # swap the content while the cache claims the old digest for the new stat
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    new = target.stat()
    cache["bin/probe"][0] = [new.st_size, new.st_mtime_ns, new.st_ctime_ns, new.st_ino, new.st_dev]
    cache_path.write_bytes(cbor2.dumps(cache))
    cove.ok("build", cwd=root)  # the cache lies to the build
    result = cove("run", "/bin/probe", "exit", "0", cwd=root)
    assert result.returncode == 3
    assert "bin/probe was modified" in result.stderr
