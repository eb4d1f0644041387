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
        if parent and {"memory", "pids"} <= set((parent / "cgroup.subtree_control").read_text().split()
                                                if (parent / "cgroup.subtree_control").exists() else ()):
            if os.access(parent, os.W_OK):
                return "cgroup2"
        return "rlimit"
    memory, pids = _own_cgroup_v1("memory"), _own_cgroup_v1("pids")
    if memory and pids and os.access(memory, os.W_OK) and os.access(pids, os.W_OK):
        return "cgroup1"
    return "rlimit"


def _remove_stale_groups(parent: Path) -> None:
    """Empty cgroups of launchers that were killed before they could clean up."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        pid = name[5:].split("-", 1)[0] if name.startswith("cove-") else ""
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            try:
                (parent / name).rmdir()  # fails harmlessly if processes remain
            except OSError:
                pass


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
            parents = ([_own_cgroup_v2()] if mode == "cgroup2"
                       else [_own_cgroup_v1("memory"), _own_cgroup_v1("pids")] if mode == "cgroup1" else [])
            for parent in parents:
                _remove_stale_groups(_found(parent))
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
            procs = self.resources.max_processes
            resource.setrlimit(resource.RLIMIT_NPROC, (procs, procs))

    def peak_memory(self) -> int | None:
        """Peak memory use of the whole enclave, where the cgroup records it."""
        for group in self.groups:
            for name in ("memory.peak", "memory.max_usage_in_bytes"):
                try:
                    return int((group / name).read_text())
                except (OSError, ValueError):
                    continue
        return None

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
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.01)
