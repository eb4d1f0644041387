"""cove add on large trees: one note per missing library, progress on a terminal."""

from __future__ import annotations

import os
import pty
import shutil
import subprocess

import pytest

from tests.conftest import COVE, require


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    """libneed.so linked against libfoo.so; libfoo.so is then removed from where it was built."""
    gcc = require("gcc")
    base = tmp_path_factory.mktemp("libs")
    (base / "foo.c").write_text("int foo(void) { return 1; }\n")
    (base / "need.c").write_text("int foo(void); int need(void) { return foo(); }\n")
    subprocess.run([gcc, "-shared", "-fPIC", "-o", base / "libfoo.so", base / "foo.c"], check=True)
    subprocess.run(
        [gcc, "-shared", "-fPIC", "-o", base / "libneed.so", base / "need.c", "-L", base, "-lfoo"], check=True
    )
    return base


def _tree(root, libs, with_foo: bool):
    for sub in ("a", "b", "c"):
        (root / sub).mkdir(parents=True)
        shutil.copy(libs / "libneed.so", root / sub / f"libneed_{sub}.so")
    if with_foo:
        (root / "server").mkdir()
        shutil.copy(libs / "libfoo.so", root / "server" / "libfoo.so")
    return root


@pytest.mark.parametrize("with_foo", [False, True], ids=["missing", "in-the-tree"])
def test_a_missing_library_is_noted_once(cove, tmp_path, libs, with_foo):
    tree = _tree(tmp_path / "tree", libs, with_foo)
    cove.ok("new", "app", cwd=tmp_path)
    added = cove.ok("add", "--to", "/opt", tree, cwd=tmp_path / "app")
    notes = [line for line in added.stderr.splitlines() if line.startswith("note:")]
    if with_foo:  # the tree brings it along (a JDK's lib/server/libjvm.so): nothing to say
        assert notes == []
    else:
        assert notes == [
            f"note: libfoo.so not found on this host, needed by 3 files in {tree}; fine if the program loads it itself"
        ]
    assert (tmp_path / "app" / "image" / "opt" / "tree" / "c" / "libneed_c.so").is_file()


def _add_on_a_terminal(cwd, env, *args) -> str:
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [COVE, "add", *args],
        cwd=cwd,
        env=dict(env, COLUMNS="100"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=follower,
    )
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the terminal's other end closed
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.wait(timeout=120) == 0, seen
    return seen.decode("utf-8", "replace")


def test_long_copies_show_progress_on_a_terminal(cove, tmp_path):
    cove.ok("new", "app", cwd=tmp_path)
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    with open(big, "wb") as handle:
        handle.truncate(80 << 20)  # sparse: 80 MB to copy, nothing on disk
    small.write_bytes(b"x" * 1000)
    assert "copying" in _add_on_a_terminal(tmp_path / "app", cove.env, "--to", "/data", big)
    assert "copying" not in _add_on_a_terminal(tmp_path / "app", cove.env, "--to", "/data", small)
    piped = cove.ok("add", "--to", "/more", big, cwd=tmp_path / "app")
    assert piped.stderr == ""  # not a terminal: no bar
