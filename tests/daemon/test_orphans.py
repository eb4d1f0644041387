"""No enclave outlives its launcher or supervisor: a kill -9 of either, even in the middle of a start.

bubblewrap's --die-with-parent ends a running enclave with its parent, but a child it has cloned
and not yet released (or whose pid 1 has not yet armed its parent-death signal) is nobody's
to kill: the next start, direct or through the daemon, and the running daemon's periodic look
kill what is left in the cgroups of dead owners and remove them (cove.runtime.limits.reap_stale,
docs/node.md). ``leftovers`` is shared with the other fault tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import require


def enclave_of(owner: int) -> tuple[set[int], set[Path]]:
    """The processes in the cove-OWNER-* cgroups (the enclave of launcher OWNER), and those groups."""
    pids: set[int] = set()
    groups: set[Path] = set()
    marker = f"/cove-{owner}-"
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            lines = Path(f"/proc/{entry.name}/cgroup").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if marker in path + "/":
                pids.add(int(entry.name))
                groups.update(Path("/sys/fs/cgroup") / c / path.lstrip("/") for c in controllers.split(",") if c)
    return pids, groups


def _children(pid: int, bwrap: bool) -> list[int]:
    """The children of a process; with ``bwrap``, only bwrap (the launcher's others are its services)."""
    found = []
    try:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            if not bwrap or Path(f"/proc/{child}/comm").read_text().strip() == "bwrap":
                found.append(int(child))
    except OSError:
        pass
    return found


def _kill_mid_start(launcher: subprocess.Popen, depth: int) -> set[Path]:
    """SIGKILL the launcher once its bwrap has forked ``depth`` levels deep; the enclave's cgroups."""
    deadline = time.monotonic() + 30
    level = [launcher.pid]
    groups: set[Path] = set()
    for _ in range(depth):
        while not (found := [c for p in level for c in _children(p, p == launcher.pid)]):
            assert launcher.poll() is None and time.monotonic() < deadline, "bwrap never started"
        level = found
        groups |= enclave_of(launcher.pid)[1]
    launcher.kill()
    launcher.wait()
    return groups | enclave_of(launcher.pid)[1]


def leftovers(owners: list[int], groups: set[Path], within: float) -> dict[str, object]:
    """What is left of these owners' enclaves after ``within`` seconds (empty when nothing is)."""
    deadline = time.monotonic() + within
    while True:
        left = {o: enclave_of(o)[0] for o in owners}
        left = {o: pids for o, pids in left.items() if pids}
        stale = sorted(str(g) for g in groups if g.exists())
        if (not left and not stale) or time.monotonic() > deadline:
            return {k: v for k, v in {"processes": left, "cgroups": stale}.items() if v}
        time.sleep(0.1)


@pytest.fixture
def direct(cove, app):
    """`cove run` without a daemon (direct mode)."""
    require("bwrap")
    env = {k: v for k, v in cove.env.items() if k != "COVE_DAEMON_SOCKET"}
    env["COVE_DAEMON_SOCKET"] = "/nonexistent/cove.sock"
    return env


def test_running_enclave_dies_with_its_killed_launcher(cove, app, direct):
    launcher = subprocess.Popen(
        cove.popen_args("run", "/bin/hello", "100"),
        cwd=app,
        env=direct,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert launcher.stdout.readline().startswith(b"hello")
    groups = enclave_of(launcher.pid)[1]
    assert groups, "the enclave runs in no cove cgroup"
    launcher.kill()
    launcher.wait()
    launcher.stdout.close()
    # the parent-death signal reaches bwrap, then its pid 1: the whole namespace ends at once
    assert leftovers([launcher.pid], set(), within=5) == {}
    cove.ok("run", "/bin/hello", cwd=app, env=direct)  # the next start removes the (empty) groups
    assert leftovers([launcher.pid], groups, within=1) == {}


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_launcher_killed_mid_start_leaves_nothing_after_the_next_start(cove, app, direct, depth):
    """Killed as bwrap forks (1), clones the sandbox (2), forks the program (3), a few times each."""
    owners: list[int] = []
    groups: set[Path] = set()
    for _ in range(4):
        launcher = subprocess.Popen(
            cove.popen_args("run", "/bin/hello", "100"),
            cwd=app,
            env=direct,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            groups |= _kill_mid_start(launcher, depth)
        finally:
            launcher.kill()
            launcher.wait()
        owners.append(launcher.pid)
    cove.ok("run", "/bin/hello", cwd=app, env=direct)
    assert leftovers(owners, groups, within=3) == {}


def _gone(pid: int) -> bool:
    """Whether a process has ended (a zombie has: this machine's pid 1 may be slow to reap)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return stat_line[stat_line.rfind(b")") + 2 :][:1] in (b"Z", b"X")


@pytest.fixture
def dead_owner_groups():
    """A cove-DEADPID-* group in the v1 memory and pids controllers, as a killed launcher leaves them,
    and a function that starts ``sleep 600`` in them as the enclave's host uid: orphaned (its parent
    gone, as bwrap's unreleased child is) or still parented by this test (as a live enclave's outer
    process is by its launcher, seen from another pid namespace or after the owner's pid was reused)."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in ("memory", "pids"):
            if c in controllers.split(","):
                own[c] = Path("/sys/fs/cgroup") / c / path.lstrip("/")
    if set(own) != {"memory", "pids"}:
        pytest.fail("this test needs the v1 memory and pids controllers (scripts/setup)", pytrace=False)
    groups = [own[c] / f"cove-{dead.pid}-0badc0de" for c in ("memory", "pids")]
    for group in groups:
        group.mkdir()
    started: list[int] = []

    def join() -> None:
        for group in groups:
            (group / "cgroup.procs").write_text(str(os.getpid()))
        os.setresuid(100000, 100000, 100000)

    def start(orphaned: bool) -> int:
        if orphaned:  # the shell exits at once: sleep's parent becomes pid 1
            shell = subprocess.run(
                ["sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"],
                preexec_fn=join,
                capture_output=True,
                text=True,
                check=True,
            )
            pid = int(shell.stdout)
        else:
            pid = subprocess.Popen(["sleep", "600"], preexec_fn=join).pid
        started.append(pid)
        return pid

    yield groups, start
    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.1)
    for group in groups:
        if group.exists():
            group.rmdir()


def test_leftover_of_a_dead_owner_is_killed_and_its_groups_removed(cove, app, direct, dead_owner_groups):
    """An orphan in a dead owner's groups: the next start kills it and removes both groups (the old
    code only removed empty groups)."""
    groups, start = dead_owner_groups
    leftover = start(orphaned=True)
    cove.ok("run", "/bin/hello", cwd=app, env=direct)
    deadline = time.monotonic() + 5
    while not _gone(leftover):
        assert time.monotonic() < deadline, "the orphan still runs"
        time.sleep(0.05)
    assert [g for g in groups if g.exists()] == []


def test_a_process_whose_parent_lives_is_never_reaped(cove, app, direct, dead_owner_groups):
    """A dead-looking owner is not enough: the owner's pid may mean another pid namespace, or have been
    reused. A process in the group whose parent lives outside it is left alone, and so is its group."""
    groups, start = dead_owner_groups
    member = start(orphaned=False)
    cove.ok("run", "/bin/hello", cwd=app, env=direct)
    time.sleep(0.3)
    assert not _gone(member)
    assert all(g.exists() for g in groups)


def test_supervisor_killed_mid_start_leaves_nothing_for_long(node, app):
    c = node.cove
    owners: list[int] = []
    groups: set[Path] = set()
    for i in range(4):
        status, view = node.api(
            "POST",
            "/v1/enclaves",
            {"instance": str(app), "program": "/bin/hello", "args": ["100"], "name": f"orphan-{i}"},
        )
        assert status == 201, view
        supervisor = view["supervisor_pid"]
        deadline = time.monotonic() + 30
        while not (found := enclave_of(supervisor))[0] and time.monotonic() < deadline:
            pass  # as soon as bwrap is in the enclave's cgroups
        groups |= found[1]
        time.sleep(0.002 * i)
        os.kill(supervisor, signal.SIGKILL)
        owners.append(supervisor)
    # the running daemon looks every half second (cove.daemon.events.watch): no next start needed
    assert leftovers(owners, groups, within=5) == {}
    c.ok("rm", "-f", *(f"orphan-{i}" for i in range(4)))
