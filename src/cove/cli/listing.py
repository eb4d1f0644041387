"""`cove ps` output, free of click so the plain `cove ps` can skip it (cove.cli.attached).

The daemon's answer is checked before it is printed: a list of enclave
views with the members the table shows, or one UnreachableError line.
"""

from __future__ import annotations

import json
import time

from cove.errors import UnreachableError

TYPE_CHECKING = False  # not typing's: the plain `cove ps` imports no typing (cove.cli says why)
if TYPE_CHECKING:
    from typing import Any

COLUMNS = ("ID", "NAME", "MEASUREMENT", "BACKEND", "STATE", "STATUS", "EXIT")
SHOWN = ("id", "name", "measurement", "backend", "state")


def age(seconds: float | None) -> str:
    if seconds is None:
        return ""
    whole = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def status(view: dict[str, Any]) -> str:
    if view["state"] == "exited":
        ago = age(time.time() - view["finished"]) if view.get("finished") else ""
        return f"Exited ({view['exit_code']}) {ago} ago" if ago else f"Exited ({view['exit_code']})"
    if view["state"] == "running":
        return f"Up {age(view.get('uptime'))}"
    return str(view["state"]).capitalize()


def _checked(views: Any) -> list[dict[str, Any]]:
    if isinstance(views, list) and all(
        isinstance(v, dict)
        and all(isinstance(v.get(k), str) for k in SHOWN)
        and isinstance(v.get("finished") or 0, (int, float))
        and isinstance(v.get("uptime") or 0, (int, float))
        for v in views
    ):
        return views
    raise UnreachableError("the Cove daemon's answer is not a list of enclaves (is it a Cove daemon of this version?)")


def ps_lines(views: Any, quiet: bool, as_json: bool) -> list[str]:
    """The lines `cove ps` prints for the API's list of enclaves."""
    if as_json:
        return [json.dumps(views, indent=2)]
    checked = _checked(views)
    if quiet:
        return [view["id"][:12] for view in checked]
    rows = [COLUMNS]
    for v in checked:
        exit_code = "" if v.get("exit_code") is None else str(v["exit_code"])
        rows.append((v["id"][:12], v["name"], v["measurement"][:12], v["backend"], v["state"], status(v), exit_code))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
