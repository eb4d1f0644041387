"""linux.cgroupsPath: the container owns only the groups `create` made; a group that existed is left alone."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cove.oci import cgroups
from tests.oci.helpers import SPEC, no_leftovers, runtime, state, wait_stopped, write_spec


@pytest.fixture
def named_groups() -> Iterator[tuple[str, list[str]]]:
    """A cgroupsPath and its folders (memory, pids; the v2 group); whatever is left is removed afterwards."""
    name = f"/cove-test-{os.getpid()}-{os.urandom(3).hex()}"
    groups = cgroups.groups_for(name)
    yield name, groups
    for group in groups:
        for folder, _, _ in sorted(os.walk(group), key=lambda item: len(item[0]), reverse=True):
            try:
                os.rmdir(folder)
            except OSError:
                pass


@pytest.mark.parametrize("existed", [True, False], ids=["pre-existing", "made-by-create"])
def test_kill_all_and_delete_touch_only_the_groups_create_made(
    bundle: Path, tmp_path: Path, named_groups: tuple[str, list[str]], existed: bool
) -> None:
    name, groups = named_groups
    bystander = None
    if existed:  # another tenant's group: a process in it, and a subgroup of its own
        bystander = subprocess.Popen(["sleep", "120"])
        for group in groups:
            os.makedirs(os.path.join(group, "keep"))
            Path(group, "cgroup.procs").write_text(str(bystander.pid))
    try:
        root = tmp_path / "state"
        spec = json.loads(json.dumps(SPEC))
        spec["process"]["args"] = ["/bin/sh", "-c", "exec sleep 60"]
        spec["linux"]["cgroupsPath"] = name
        write_spec(bundle, spec)
        assert runtime(root, "create", "--bundle", str(bundle), "g").returncode == 0
        assert runtime(root, "start", "g").returncode == 0
        pid = state(root, "g")["pid"]
        for _ in range(400):  # the container's process joins the groups on start
            if all(str(pid) in Path(g, "cgroup.procs").read_text().split() for g in groups):
                break
            time.sleep(0.02)
        assert runtime(root, "kill", "--all", "g", "KILL").returncode == 0
        wait_stopped(root, "g", pid)
        assert runtime(root, "delete", "g").returncode == 0
        no_leftovers(root, "g")
        if bystander is not None:
            assert bystander.poll() is None, "kill --all killed a process of a group the container did not make"
            for group in groups:
                assert os.path.isdir(os.path.join(group, "keep")), "delete removed a subgroup it did not make"
                assert str(bystander.pid) in Path(group, "cgroup.procs").read_text().split()
        else:
            assert not any(os.path.exists(g) for g in groups), "delete left the groups create made"
    finally:
        if bystander is not None:
            bystander.kill()
            bystander.wait()
