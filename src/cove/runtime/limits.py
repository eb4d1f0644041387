"""Resource limits for an enclave: a cgroup when one can be made, rlimits otherwise.

A cgroup (v2, or the v1 memory and pids controllers) limits the enclave as a
whole: all its processes share one memory budget and one process count. When
no cgroup can be created the limits fall back to per-process rlimits
(RLIMIT_AS, RLIMIT_NPROC), which are weaker; `cove info` says which is used.
The open-files limit is always RLIMIT_NOFILE, per process.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from cove.config import ResourcesSection

MEMORY_UNITS = (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10))


def memory_text(size: int) -> str:
    """A byte count as cove.toml writes it: 536870912 -> "512M"."""
    for suffix, unit in MEMORY_UNITS:
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def tmpfs_size(resources: ResourcesSection, requested: int | None = None) -> int:
    """The size of a tmpfs the sandbox makes: its requested size, at most resources.memory.

    Under rlimits nothing charges tmpfs pages to the enclave, so an unsized tmpfs (half of the
    host's RAM) or a larger one would let a program store more than its memory limit in files. A
    size of 0 (unlimited to the kernel) or none is the memory limit; a larger one is capped to it.
    """
    memory = resources.memory
    return memory if not requested else min(requested, memory)


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _own_cgroup_v1(controller: str) -> Path | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controller in controllers.split(","):
                return CGROUP_ROOT / controller / path.lstrip("/")
    except OSError:
        return None
    return None


def _own_cgroup_v2() -> Path | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return CGROUP_ROOT / line[3:].lstrip("/")
    except OSError:
        return None
    return None


def _found(group: Path | None) -> Path:
    """This process's cgroup, or OSError (limits then fall back to rlimits) if it has none."""
    if group is None:
        raise FileNotFoundError("this process is in no cgroup of that hierarchy")
    return group


def detect_mode() -> str:
    """Which mechanism limits enclaves here: 'cgroup2', 'cgroup1' or 'rlimit'."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        parent = _own_cgroup_v2()
        if parent and {"memory", "pids"} <= set(
            (parent / "cgroup.subtree_control").read_text().split()
            if (parent / "cgroup.subtree_control").exists()
            else ()
        ):
            if os.access(parent, os.W_OK):
                return "cgroup2"
        return "rlimit"
    memory, pids = _own_cgroup_v1("memory"), _own_cgroup_v1("pids")
    if memory and pids and os.access(memory, os.W_OK) and os.access(pids, os.W_OK):
        return "cgroup1"
    return "rlimit"


def _owner(name: str) -> int | None:
    """The pid that made a cove-PID-HEX cgroup (its launcher or supervisor), None for other names."""
    pid = name[5:].split("-", 1)[0] if name.startswith("cove-") else ""
    return int(pid) if pid.isdigit() else None


def _cove_groups_of(pid: str) -> set[Path]:
    """Every cove-* cgroup a process is in (the same enclave's groups in the other controllers)."""
    found: set[Path] = set()
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if not Path(path).name.startswith("cove-"):
            continue
        if controllers:
            found.update(
                CGROUP_ROOT / c / path.lstrip("/") for c in controllers.split(",") if not c.startswith("name=")
            )
        elif (CGROUP_ROOT / "cgroup.controllers").exists():
            found.add(CGROUP_ROOT / path.lstrip("/"))
    return found


def kill_and_remove(group: Path, timeout: float = 2.0) -> bool:
    """SIGKILL every process in an enclave's cgroup, then remove it and the enclave's groups in the
    other controllers; whether it is gone.

    The enclave's ids cannot move a process out (cgroup.procs elsewhere belongs to root) and its
    pids.max bounds how many it can fork meanwhile, so killing until the group is empty ends.
    cgroup v2 kills the whole group at once (cgroup.kill).
    """
    siblings: set[Path] = set()
    deadline = time.monotonic() + timeout
    delay = 0.0005  # the kernel lets go of killed tasks within a millisecond or so: look again soon
    while True:
        try:
            pids = (group / "cgroup.procs").read_text().split()
        except FileNotFoundError:
            break
        except OSError:
            return False
        if "0" in pids:  # a member in a pid namespace this process cannot see: not ours to judge
            return False
        if pids and (group / "cgroup.kill").exists():
            try:
                (group / "cgroup.kill").write_text("1")
            except OSError:
                pass
        for pid in pids:
            siblings |= _cove_groups_of(pid)
            _kill(int(pid))
        try:
            group.rmdir()
            break
        except FileNotFoundError:
            break
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
    for other in siblings - {group}:
        try:
            other.rmdir()  # empty now: its processes were the ones just killed
        except OSError:
            pass
    return True


def _remove_stale_groups(parent: Path) -> None:
    """Kill what is left in the cgroups of launchers and supervisors that died (kill -9) and remove them.

    The owner's pid in a group's name means something only in the owner's pid namespace, and a pid can
    be reused, so a dead-looking owner is not enough: the group's processes must also be orphans (each
    one's parent is in the group or is pid 1), as a killed owner leaves them. A live enclave's outer
    process has its launcher or supervisor as parent, whatever namespace the reaper looks from, and a
    group holding processes this pid namespace cannot see (listed as 0 on cgroup v2, left out on v1) is
    never touched. Owners are looked up once per listing, not across controllers, so a pid reused
    between two listings is judged again.
    """
    try:
        names = os.listdir(parent)
    except OSError:
        return
    alive: dict[int, bool] = {}
    for name in names:
        pid = _owner(name)
        if pid is None:
            continue
        if pid not in alive:
            alive[pid] = _alive(pid)
        if not alive[pid] and _orphaned(parent / name):
            kill_and_remove(parent / name)


def _orphaned(group: Path) -> bool:
    """Whether every process in the group is visible here and has lost the process that started it."""
    try:
        members = (group / "cgroup.procs").read_text().split()
    except OSError:
        return False
    if "0" in members:
        return False
    pids = {int(pid) for pid in members}
    for pid in pids:
        parent = _parent(pid)
        if parent is not None and parent not in pids and parent != 1:
            return False
    return True


def _parent(pid: int) -> int | None:
    """A process's parent pid (0 for a parent outside this pid namespace); None once it has exited."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat_line = handle.read(1024)
    except OSError:
        return None
    fields = stat_line[stat_line.rfind(b")") + 2 :].split()
    return int(fields[1]) if len(fields) > 1 else None


def _kill(pid: int) -> None:
    """SIGKILL one process; never pid 0 or a negative pid (this process group, or every process)."""
    if pid <= 0:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie does not: a killed supervisor's parent may be slow to reap it)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return False
    try:
        stat_line = os.read(fd, 512)
    except OSError:
        return False
    finally:
        os.close(fd)
    return stat_line[stat_line.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


def _tasks_of(uid: int) -> int:
    """How many tasks (threads, zombies too) run with this real uid: what RLIMIT_NPROC counts."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as handle:
                status = handle.read(4096)
        except OSError:
            continue
        fields = dict(line.split(b":", 1) for line in status.splitlines() if b":" in line)
        try:
            if int(fields[b"Uid"].split()[0]) == uid:
                count += int(fields.get(b"Threads", b"1").strip() or 1)
        except (KeyError, ValueError, IndexError):
            continue
    return count


def parents() -> list[Path]:
    """The cgroups under which this process makes enclave cgroups (none when limits are rlimits)."""
    mode = detect_mode()
    found = (
        [_own_cgroup_v2()]
        if mode == "cgroup2"
        else [_own_cgroup_v1("memory"), _own_cgroup_v1("pids")]
        if mode == "cgroup1"
        else []
    )
    return [parent for parent in found if parent is not None]


def reap_stale() -> None:
    """Kill the leftovers of enclaves whose launcher or supervisor died, and remove their cgroups.

    bubblewrap's --die-with-parent cannot cover a kill in the middle of its start: a child it
    cloned but has not yet released waits on it forever, outside any parent-death signal. Every
    start and the daemon's start call this; docs/node.md says what survives a kill -9 and for how long.
    """
    for parent in parents():
        _remove_stale_groups(parent)


@dataclass
class Limits:
    """The limits of one enclave; apply_in_child runs in the child before exec."""

    resources: ResourcesSection
    mode: str
    groups: tuple[Path, ...] = ()

    @classmethod
    def create(cls, resources: ResourcesSection) -> Limits:
        mode = detect_mode()
        name = f"cove-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            reap_stale()
            if mode == "cgroup2":
                group = _found(_own_cgroup_v2()) / name
                group.mkdir()
                (group / "memory.max").write_text(str(resources.memory))
                if (group / "memory.swap.max").exists():
                    (group / "memory.swap.max").write_text("0")
                (group / "pids.max").write_text(str(resources.max_processes))
                return cls(resources, mode, (group,))
            if mode == "cgroup1":
                memory = _found(_own_cgroup_v1("memory")) / name
                pids = _found(_own_cgroup_v1("pids")) / name
                memory.mkdir()
                pids.mkdir()
                (memory / "memory.limit_in_bytes").write_text(str(resources.memory))
                if (memory / "memory.memsw.limit_in_bytes").exists():
                    (memory / "memory.memsw.limit_in_bytes").write_text(str(resources.memory))
                (pids / "pids.max").write_text(str(resources.max_processes))
                return cls(resources, mode, (memory, pids))
        except OSError:
            pass
        return cls(resources, "rlimit")

    def apply_in_child(self) -> None:
        """Join the cgroups (or set rlimits); called between fork and exec."""
        pid = str(os.getpid())
        for group in self.groups:
            with open(group / "cgroup.procs", "w") as handle:
                handle.write(pid)
        files = self.resources.max_open_files
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
        if self.mode == "rlimit":
            memory = self.resources.memory
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
            # RLIMIT_NPROC counts every task of the real uid, the launcher's and its services' threads
            # (and unreaped zombies) included: allow max_processes on top of those, not in place of them
            procs = self.resources.max_processes + max(0, _tasks_of(os.getuid()) - 1)
            resource.setrlimit(resource.RLIMIT_NPROC, (procs, procs))

    def oom_kills(self) -> int:
        """How many of the enclave's processes the kernel killed for exceeding the memory limit
        (v2 memory.events, v1 memory.oom_control); 0 when no cgroup records it."""
        for group in self.groups:
            for name in ("memory.events", "memory.oom_control"):
                try:
                    for line in (group / name).read_text().splitlines():
                        key, _, value = line.partition(" ")
                        if key == "oom_kill":
                            return int(value)
                except (OSError, ValueError):
                    continue
        return 0

    def release(self) -> None:
        """Kill anything left in the cgroups and remove them."""
        for group in self.groups:
            delay = 0.0005  # the kernel lets go of exited tasks within a millisecond or so: look again soon
            for _ in range(60):  # at most about half a second
                try:
                    pids = (group / "cgroup.procs").read_text().split()
                except OSError:
                    break
                for pid in pids:
                    _kill(int(pid))
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.01)
