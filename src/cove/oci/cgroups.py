"""The container's own cgroup (config.json linux.cgroupsPath and linux.resources), as runc makes it.

The engine names a cgroup for the container and the limits it wants on it
(`podman run --memory`, a pod's memory limit). `create` makes that group
(memory and pids: what Cove limits; the unified group on cgroup v2) and
writes the limits; the container's process joins it only after `start`,
just before it launches the enclave. Everything Cove does before that (the
Python start, verification, the copy of the image, imports) was charged
to the engine's cgroup, where the runtime runs, so a small limit holds the
program and what the launcher does for it, not Cove's start-up. The
enclave's own groups (cove.runtime.limits, with the measured limits) are
made below it, so the engine's limit caps the enclave as a whole and
`podman stats` sees it. `delete` removes the groups create made (not one
that existed before) with cove.oci.cli.remove_groups, which needs no
cove.errors.
"""

from __future__ import annotations

import os
import posixpath

from cove.errors import CoveError
from cove.oci.cli import remove_groups

ROOT = "/sys/fs/cgroup"
V1_CONTROLLERS = ("memory", "pids")


class CgroupError(CoveError):
    """linux.cgroupsPath or linux.resources cannot be honoured (exit 2)."""


def _membership() -> list[tuple[list[str], str]]:
    """This process's groups from /proc/self/cgroup: (controllers, path) per hierarchy ([] is the v2 one)."""
    try:
        with open("/proc/self/cgroup") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    found: list[tuple[list[str], str]] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        found.append((controllers.split(",") if controllers else [], path))
    return found


def _own(controller: str | None) -> str | None:
    """This process's group in one v1 controller's hierarchy (None: the v2 group)."""
    for controllers, path in _membership():
        if (controller is None and not controllers) or (controller and controller in controllers):
            return path
    return None


def own() -> list[str]:
    """The folders of this process's groups that Cove limits in (memory, pids; the v2 group).

    Without linux.cgroupsPath the launcher makes the enclave's groups below
    these (inherited from the engine): `kill --all` and `delete` look there
    for cove-PID-… only.
    """
    found: list[str] = []
    for controllers, path in _membership():
        if not controllers:
            if _unified():  # on a v1 hybrid the launcher limits in v1 only (cove.runtime.limits)
                found.append(ROOT + path)
        elif "memory" in controllers or "pids" in controllers:
            found.append(os.path.join(ROOT, ",".join(controllers)) + path)
    return found


def _unified() -> bool:
    return os.path.exists(os.path.join(ROOT, "cgroup.controllers"))


def groups_for(cgroups_path: str) -> list[str]:
    """The folders of cgroupsPath: one per v1 controller Cove uses, or the v2 group. Relative paths are below
    the runtime's own group, as runc reads them; systemd's "slice:prefix:name" is not handled here."""
    if ":" in cgroups_path:
        raise CgroupError(
            f"config.json: linux.cgroupsPath {cgroups_path!r} is a systemd unit",
            "use the cgroupfs manager (podman --cgroup-manager=cgroupfs; containerd: SystemdCgroup = false)",
        )
    parts = [p for p in cgroups_path.split("/") if p not in ("", ".")]
    if ".." in parts or not parts:
        raise CgroupError(f"config.json: linux.cgroupsPath {cgroups_path!r} is not a cgroup path")
    found = []
    for controller in (None,) if _unified() else V1_CONTROLLERS:
        base = "" if cgroups_path.startswith("/") else (_own(controller) or "")
        relative = posixpath.normpath(posixpath.join("/", base, *parts)).lstrip("/")
        found.append(os.path.join(ROOT, controller or "", relative) if controller else os.path.join(ROOT, relative))
    return found


def make(groups: list[str], memory: int | None, pids: int | None) -> list[str]:
    """Create the groups and write the engine's limits; the groups this call made, the only ones the
    container owns: a group that existed (another container's, the engine's) is joined and limited, never
    signalled or removed by `kill --all` and `delete`."""
    made: list[str] = []
    try:
        for group in groups:
            if not os.path.isdir(group):
                os.makedirs(group, exist_ok=True)
                made.append(group)
            _write_limits(group, memory, pids)
    except OSError as exc:
        remove_groups(made)
        raise CgroupError(f"config.json: linux.cgroupsPath: cannot set up {group}: {exc.strerror or exc}") from None
    return made


def _write_limits(group: str, memory: int | None, pids: int | None) -> None:
    files: list[tuple[str, int]] = []
    if memory is not None:
        files += [("memory.limit_in_bytes", memory), ("memory.max", memory)]
    if pids is not None:
        files += [("pids.max", pids)]
    for name, value in files:
        path = os.path.join(group, name)
        if value > 0 and os.path.exists(path):  # 0 or -1: no limit, as the engine's default
            with open(path, "w") as handle:
                handle.write(str(value))


def join(groups: list[str]) -> None:
    """Move this process into the groups (its children follow it there)."""
    for group in groups:
        with open(os.path.join(group, "cgroup.procs"), "w") as handle:
            handle.write(str(os.getpid()))
