"""What /proc says of a sandbox's processes: the one copy the daemon and cove-runtime share.

A sandbox started by a supervisor (or a container's shim) is bubblewrap's:
the supervisor's child ``bwrap``, whose child is the sandbox's pid 1, whose
first child is the enclave's program. A pid read here may be reused once its
process ends: callers that act on it later pair it with :func:`process_start`.
"""

from __future__ import annotations


def children(pid: int) -> list[int]:
    """The child pids of pid's main thread; empty when it is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except (OSError, ValueError):
        return []


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """The start time of pid in clock ticks (field 22 of /proc/PID/stat), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2 :].split()[19])


def sandbox_init(parent: int) -> int | None:
    """The host pid of the sandbox's pid 1: the child of parent's child ``bwrap``."""
    for child in children(parent):
        if comm(child) == "bwrap":
            inner = children(child)
            if inner:
                return inner[0]
    return None


def enclave_program(parent: int) -> int | None:
    """The host pid of the enclave's program (the first child of the sandbox's pid 1), None if none yet."""
    init = sandbox_init(parent)
    program = children(init) if init is not None else []
    return program[0] if program else None
