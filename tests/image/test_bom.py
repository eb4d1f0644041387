"""cove add: programs with what they load, trees with their symlinks, all or nothing."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from cove.errors import CoveError
from cove.image import bom
from tests.conftest import error_line, require


def ldd_paths(program: str) -> set[str]:
    """What the host's loader maps for program, by the path it opened."""
    require("ldd")
    output = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    paths = set()
    for line in output.splitlines():
        match = re.search(r"(?:=> )?(/\S+) \(0x", line)
        if match:
            paths.add(match.group(1))
    return paths


@pytest.mark.parametrize("program", ["/usr/bin/python3.11", "/usr/bin/openssl", "/bin/ls"])
def test_dependencies_match_the_host_loader(program):
    if not os.path.exists(program):
        pytest.fail(f"{program} is missing: run `sudo scripts/setup`", pytrace=False)
    planned = {item.source for item in bom.plan([program]).items}
    for path in ldd_paths(program):
        # the loader may report a library by a symlinked folder (/lib vs /usr/lib)
        assert path in planned or os.path.realpath(path) in {os.path.realpath(p) for p in planned}, path


def test_added_program_runs_with_its_libraries(cove, tmp_path):
    cove.ok("new", "app", cwd=tmp_path)
    root = tmp_path / "app"
    cove.ok("add", "/usr/bin/python3.11", cwd=root)
    image = root / "image"
    interp = image / "lib64" / "ld-linux-x86-64.so.2"
    assert interp.is_symlink(), "the interpreter's symlink is kept"
    assert (image / os.readlink(interp).lstrip("/")).is_file()
    assert (image / "usr" / "bin" / "python3.11").stat().st_mode & 0o111


def test_trees_keep_symlinks_and_pull_their_targets(tmp_path):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "data.txt").write_text("x")
    (tree / "rel").symlink_to("sub/data.txt")
    outside = tmp_path / "outside.txt"
    outside.write_text("y")
    (tree / "abs").symlink_to(outside)
    the_plan = bom.plan([str(tree)], to="/opt")
    kinds = {item.dest: item.kind for item in the_plan.items}
    assert kinds["/opt/tree/rel"] == bom.SYMLINK
    assert kinds["/opt/tree/abs"] == bom.SYMLINK
    assert kinds[str(outside)] == bom.FILE  # the target outside the tree comes along at its path
    image = tmp_path / "image"
    image.mkdir()
    bom.apply(image, the_plan)
    assert os.readlink(image / "opt" / "tree" / "rel") == "sub/data.txt"
    assert (image / "opt" / "tree" / "sub" / "data.txt").read_text() == "x"
    assert (image / str(outside).lstrip("/")).read_text() == "y"


def test_unknown_path_copies_nothing(cove, tmp_path):
    cove.ok("new", "app", cwd=tmp_path)
    root = tmp_path / "app"
    before = sorted(p.name for p in (root / "image").rglob("*"))
    result = cove("add", "/bin/ls", "/no/such/program", cwd=root)
    assert result.returncode == 2
    assert "/no/such/program: no such file or directory" in error_line(result)
    assert sorted(p.name for p in (root / "image").rglob("*")) == before


def test_special_files_are_refused_before_copying(tmp_path):
    image = tmp_path / "image"
    image.mkdir()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(CoveError, match="not a regular file"):
        bom.plan(["/bin/ls", str(fifo)], to="/x")
    assert list(image.iterdir()) == []


def test_failure_midway_rolls_back(tmp_path, monkeypatch):
    image = tmp_path / "image"
    (image / "bin").mkdir(parents=True)
    (image / "bin" / "old").write_text("old content")
    a = tmp_path / "old"
    a.write_text("new content")
    b = tmp_path / "b"
    b.write_text("b")
    the_plan = bom.plan([str(a), str(b)], to="/bin")
    real_copy = bom.shutil.copyfile
    calls = []

    def failing_copy(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_copy(src, dst)

    monkeypatch.setattr(bom.shutil, "copyfile", failing_copy)
    with pytest.raises(CoveError, match="nothing was added"):
        bom.apply(image, the_plan)
    assert (image / "bin" / "old").read_text() == "old content"
    assert not (image / "bin" / "b").exists()
    assert sorted(p.name for p in image.parent.iterdir()) == ["b", "image", "old"]


def test_symlinks_in_the_image_never_lead_to_the_host(tmp_path):
    image = tmp_path / "image"
    image.mkdir()
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    (image / "opt").symlink_to(host_dir)  # absolute: must be read inside the image
    program = tmp_path / "prog"
    program.write_text("#!/bin/sh\n")
    bom.apply(image, bom.plan([str(program)], to="/opt"))
    assert list(host_dir.iterdir()) == []
    assert (image / str(host_dir).lstrip("/") / "prog").is_file()


def test_bom_file(cove, tmp_path):
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "app.sh").write_text("#!/bin/sh\necho bom\n")
    (tmp_path / "files" / "app.sh").chmod(0o755)
    (tmp_path / "cove.bom").write_text('[[copy]]\nfrom = "/bin/sh"\n\n[[copy]]\nfrom = "files/app.sh"\nto = "/app"\n')
    cove.ok("new", "app", cwd=tmp_path)
    root = tmp_path / "app"
    cove.ok("add", "--bom", str(tmp_path / "cove.bom"), cwd=root)
    assert (root / "image" / "app" / "app.sh").read_text().endswith("echo bom\n")
    assert (root / "image" / "bin" / "sh").exists()


def test_bad_bom_file(cove, tmp_path):
    (tmp_path / "cove.bom").write_text('[[copy]]\nsource = "/bin/sh"\n')
    cove.ok("new", "app", cwd=tmp_path)
    result = cove("add", "--bom", str(tmp_path / "cove.bom"), cwd=tmp_path / "app")
    assert result.returncode == 2
    assert "copy[0] needs from" in error_line(result)


HOSTILE_BOMS = {
    "deep nesting": ("copy = " + "[" * 5000 + "]" * 5000, "not valid TOML"),  # was a RecursionError
    "trailing garbage": ('[[copy]]\nfrom = "/bin/sh"\n"trailing', "not valid TOML"),
    "wrong top-level type": ("copy = 5", "copy must be [[copy]] tables"),  # was a TypeError
    "copy as text": ('copy = "/bin/sh"', "copy must be [[copy]] tables"),  # was copy[0] of its characters
    "wrong field type": ("[[copy]]\nfrom = 5", "copy[0] needs from"),
    "not UTF-8": (b"\xff\xfe", "cannot read"),
}


@pytest.mark.parametrize("case", HOSTILE_BOMS)
def test_hostile_bom_file_is_one_line(tmp_path, case):
    text, words = HOSTILE_BOMS[case]
    path = tmp_path / "cove.bom"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CoveError, match=re.escape(words)) as caught:
        bom.plan_bom(path)
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)
