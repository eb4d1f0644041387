"""Many start/stop cycles through the daemon leave no mount, cgroup, process, folder or descriptor behind.

CI runs a modest number; ``COVE_DAEMON_CYCLES=1000`` runs the issue's thousand (docs/node.md).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from cove.runtime.launcher import runtime_dir

CYCLES = int(os.environ.get("COVE_DAEMON_CYCLES", "25"))


def _cgroups(pids: set[int]) -> int:
    """Cove's per-enclave cgroups (cove-PID-...) made by these supervisors, under this process's groups."""
    prefixes = tuple(f"cove-{pid}-" for pid in pids)
    count = 0
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            base = Path("/sys/fs/cgroup") / controller / path.lstrip("/")
            if prefixes and base.is_dir():
                count += sum(1 for p in base.iterdir() if p.name.startswith(prefixes))
    return count


def _processes(markers: tuple[bytes, ...]) -> set[int]:
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as handle:
                    cmdline = handle.read()
            except OSError:
                continue
            if any(marker in cmdline for marker in markers):
                found.add(int(entry.name))
    return found


def snapshot(node, app, pids: set[int]) -> dict:
    """What the daemon and the enclaves of these supervisors hold (other tests may run beside these)."""
    daemon = node.process.pid
    workdirs = tuple(f"cove-enclave-{pid}-" for pid in pids) or ("-none-",)
    return {
        "mounts": sum(1 for line in open("/proc/self/mounts") if any(w in line for w in workdirs)),
        "cgroups": _cgroups(pids),
        "processes": _processes(
            (str(node.root).encode(), str(app).encode(), b"/bin/hello\x00100", *(w.encode() for w in workdirs))
        ),
        "workdirs": sum(1 for p in runtime_dir().iterdir() if p.name.startswith(workdirs)),
        "daemon_fds": len(os.listdir(f"/proc/{daemon}/fd")),
        "daemon_threads": len(os.listdir(f"/proc/{daemon}/task")),
        "enclaves": len(os.listdir(node.root / "enclaves")),
    }


def test_start_stop_cycles_leak_nothing(node, app):
    node.api("POST", "/v1/enclaves", {"instance": str(app), "program": "/bin/hello", "name": "warm"})
    node.until("warm", "exited")
    node.api("DELETE", "/v1/enclaves/warm")
    pids: set[int] = set()
    before = snapshot(node, app, pids)
    started = time.monotonic()
    for i in range(CYCLES):
        status, view = node.api(
            "POST",
            "/v1/enclaves",
            {"instance": str(app), "program": "/bin/hello", "args": ["100"], "name": f"cycle-{i}"},
        )
        assert status == 201, view
        pids.add(view["supervisor_pid"])
        if i % 2:
            node.until(view["id"], "running")
        status, stopped = node.api("POST", f"/v1/enclaves/{view['id']}/stop?timeout=5")
        assert status == 200 and stopped["state"] == "exited", stopped
        assert node.api("DELETE", f"/v1/enclaves/{view['id']}")[0] == 200
    elapsed = time.monotonic() - started
    deadline = time.monotonic() + 10

    def leaked() -> dict:
        after = snapshot(node, app, pids)
        after["processes"] -= before["processes"]  # new ones only (an earlier test's may end meanwhile)
        # more than before is a leak (fewer is a request thread of the warm-up that had not yet ended)
        return {k: v for k, v in after.items() if (v != set() if k == "processes" else v > before[k])}

    while leaked() and time.monotonic() < deadline:
        time.sleep(0.2)  # FUSE servers unmount as they leave
    assert leaked() == {}, f"after {CYCLES} cycles ({elapsed:.1f} s)"
    print(f"{CYCLES} cycles in {elapsed:.1f} s: nothing left behind ({before})")
