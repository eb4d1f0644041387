"""`cove-runtime delete` never reaches into a mount below a container's folder, and a damaged state is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require
from tests.oci.helpers import one_line, runtime

STOPPED = {"id": "c1", "pid": 0, "bundle": "/b", "cgroups": []}


def _save(root: Path, ident: str, state: object) -> None:
    from cove.oci import cli

    os.makedirs(root / ident, exist_ok=True)
    cli.Container(str(root), ident).save(state)  # type: ignore[arg-type]  # damaged on purpose in some tests


def _mounts_below(folder: Path) -> list[str]:
    """The mount table's points below folder, deepest first (read here, not with the code under test)."""
    prefix = os.path.realpath(folder) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1].replace("\\040", " ") for line in mounts]
    return sorted((p for p in points if p.startswith(prefix)), reverse=True)


def _tmpfs_with_file(point: Path) -> int:
    """Mount a tmpfs at point holding `file`; a descriptor of its root, to look inside once it is detached."""
    point.mkdir(parents=True)
    subprocess.run([require("mount"), "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)], check=True)
    (point / "file").write_text("keep")
    return os.open(point, os.O_RDONLY | os.O_DIRECTORY)


def _wait_until(check, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _unmount_all(folder: Path) -> None:
    for point in _mounts_below(folder):
        subprocess.run(["umount", "-l", point], capture_output=True)


def test_delete_through_a_symlinked_root_unmounts_and_never_removes_inside_a_mount(tmp_path):
    """A tmpfs mounted below the container's folder, and one an older runtime left under its .gone-* folder, with
    --root given through a symlink (as /var/run is /run on Debian): both are detached, not emptied; nothing is left."""
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "link").symlink_to(root)
    _save(root, "c1", STOPPED)
    held = [_tmpfs_with_file(root / "c1" / "sub"), _tmpfs_with_file(root / ".gone-c0-1" / "sub")]
    try:
        result = runtime(tmp_path / "link", "delete", "c1")
        assert result.returncode == 0 and result.stderr == "", result.stderr
        for fd in held:
            assert os.listdir(fd) == ["file"]  # old code: rm -rf emptied the tmpfs through the folder
        assert _mounts_below(tmp_path) == []
        assert _wait_until(lambda: os.listdir(root) == []), os.listdir(root)
    finally:
        for fd in held:
            os.close(fd)
        _unmount_all(tmp_path)


def _deep_mount(base: Path) -> None:
    """A tmpfs holding `file` at a path longer than PATH_MAX below base: listed in the mount table, but no path
    call reaches it (umount2 fails with ENAMETOOLONG); made by walking down relative names in a child."""
    script = (
        "import os, subprocess, sys\n"
        "os.chdir(sys.argv[1])\n"
        "for _ in range(24):\n"
        "    os.mkdir('d' * 200)\n"
        "    os.chdir('d' * 200)\n"
        "os.mkdir('m')\n"
        "subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', 'm'], check=True)\n"
        "open('m/file', 'w').write('keep')\n"
    )
    subprocess.run([sys.executable, "-c", script, str(base)], check=True)


def _deep_unmount(point: str) -> str:
    """Unmount a mount point however long its path (one relative step at a time); what its `file` held."""
    script = (
        "import os, subprocess, sys\n"
        "os.chdir('/')\n"
        "*parents, name = sys.argv[1].strip('/').split('/')\n"
        "for step in parents:\n"
        "    os.chdir(step)\n"
        "print(open(name + '/file').read() if os.path.exists(name + '/file') else 'gone')\n"
        "subprocess.run(['umount', '-l', name], check=True)\n"
    )
    return subprocess.run([sys.executable, "-c", script, point], check=True, capture_output=True, text=True).stdout


def test_delete_refuses_in_one_line_while_something_stays_mounted(tmp_path):
    """A mount that cannot be unmounted: `delete` says so in one line (exit 2) and renames and removes nothing; once
    it is unmounted, `delete` finishes."""
    root = tmp_path / "root"
    _save(root, "c1", STOPPED)
    _deep_mount(root / "c1")
    try:
        (point,) = _mounts_below(root)
        result = runtime(root, "delete", "--force", "c1")
        assert result.returncode == 2 and "cannot be unmounted" in one_line(result)
        assert sorted(os.listdir(root)) == ["c1"]
        assert _deep_unmount(point) == "keep\n"
        assert runtime(root, "delete", "c1").returncode == 0
        assert _wait_until(lambda: os.listdir(root) == []), os.listdir(root)
    finally:
        for point in _mounts_below(tmp_path):
            _deep_unmount(point)


def test_a_leftover_rm_cannot_remove_is_retried_a_bounded_number_of_times(tmp_path):
    """An undeletable .gone-* folder (an immutable file in it) is retried by the next three deletes, then left
    alone; the others go."""
    from cove.oci import cli

    root = tmp_path / "root"
    stuck = root / ".gone-stuck-1"
    stuck.mkdir(parents=True)
    (stuck / "file").write_text("x")
    (root / ".gone-old-2").mkdir()
    subprocess.run([require("chattr"), "+i", str(stuck / "file")], check=True)
    try:
        for turn in range(cli.RETRIES + 2):
            _save(root, "c1", STOPPED)
            assert runtime(root, "delete", "c1").returncode == 0
            tries = min(turn + 1, cli.RETRIES)
            expected = [".gone-stuck-1" + cli.RETRY * tries]
            assert _wait_until(lambda want=expected: sorted(os.listdir(root)) == want), (turn, os.listdir(root))
    finally:
        for name in os.listdir(root):
            subprocess.run(["chattr", "-i", str(root / name / "file")], capture_output=True)


DAMAGED = {
    "no bundle": {"pid": 1},
    "cgroups not a list": dict(STOPPED, cgroups=5),
    "pid a string": dict(STOPPED, pid="123"),
    "pid negative": dict(STOPPED, pid=-1),
    "pid a bool": dict(STOPPED, pid=True),
    "pid beyond PID_MAX_LIMIT": dict(STOPPED, pid=1 << 40),
    "bundle a number": dict(STOPPED, bundle=5),
    "pid_start a string": dict(STOPPED, pid_start="7"),
    "a relative cgroup": dict(STOPPED, container_cgroups=["cove"]),
    "a NUL in a cgroup": dict(STOPPED, cgroups=["/sys/fs/cgroup/a\0b"]),
    "annotation not a string": dict(STOPPED, annotations={"a": 1}),
    "unmeasured a string": dict(STOPPED, unmeasured="no"),
    "created a string": dict(STOPPED, created="today"),
    "not a map": [1, 2],
}


@pytest.mark.parametrize("legacy", [False, True], ids=["marshal", "json"])
@pytest.mark.parametrize("damage", sorted(DAMAGED))
def test_a_damaged_state_field_is_one_line_exit_2_for_every_command(tmp_path, damage, legacy):
    root = tmp_path / "root"
    if legacy:  # the state.json an earlier runtime wrote
        (root / "c1").mkdir(parents=True)
        (root / "c1" / "state.json").write_text(json.dumps(DAMAGED[damage]))
    else:
        _save(root, "c1", DAMAGED[damage])
    for argv in (["state", "c1"], ["start", "c1"], ["kill", "c1"], ["kill", "--all", "c1"], ["delete", "c1"]):
        result = runtime(root, *argv)
        assert result.returncode == 2 and "state is damaged" in one_line(result), (argv, result.stderr)
    assert runtime(root, "delete", "--force", "c1").returncode == 0
    assert _wait_until(lambda: os.listdir(root) == [])


def test_a_well_formed_state_with_every_field_still_loads(tmp_path):
    root = tmp_path / "root"
    full = dict(
        STOPPED,
        pid_start=None,
        container_cgroups=["/sys/fs/cgroup/memory/x"],
        created=1.5,
        annotations={"a": "b"},
        unmeasured=True,
        future="ignored",
    )
    _save(root, "c1", full)
    shown = json.loads(runtime(root, "state", "c1").stdout)
    assert shown["status"] == "stopped" and shown["annotations"] == {"a": "b", "cove.dev/unmeasured": "true"}
