"""Per-enclave ownership: a member of the group sees and acts on its own enclaves only, root on all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, require

MEMBER = 4242
# every /enclaves/REF route, as the member, through the thin client (standard library only)
AS_MEMBER = """
import json, sys
from cove.daemon.client import Client, DaemonError
ref, own = sys.argv[1], sys.argv[2]
client, out = Client(), {}
out["mine"] = client.call("GET", f"/enclaves/{own}")["id"] if own != "-" else None
calls = {"view": ("GET", f"/enclaves/{ref}", None), "logs": ("GET", f"/enclaves/{ref}/logs?tail=5", None),
         "exec": ("POST", f"/enclaves/{ref}/exec", {"argv": ["/bin/hello"]}),
         "kill": ("POST", f"/enclaves/{ref}/kill?signal=TERM", None),
         "stop": ("POST", f"/enclaves/{ref}/stop?timeout=0", None),
         "wait": ("POST", f"/enclaves/{ref}/wait", None), "rm": ("DELETE", f"/enclaves/{ref}?force=true", None),
         "prefix": ("GET", f"/enclaves/{ref[:12]}", None)}
for what, (method, path, body) in calls.items():
    try:
        client.call(method, path, body)
        out[what] = "served"
    except DaemonError as exc:
        out[what] = exc.exit_code
    except Exception as exc:
        out[what] = type(exc).__name__
out["list"] = sorted(e["id"] for e in client.call("GET", "/enclaves?all=true"))
lines = b"".join(client.stream("/events", {"follow": "false"})).splitlines()
out["events"] = sorted({json.loads(line).get("id") for line in lines if line.strip()})
print(json.dumps(out))
"""


def _as_member(node, group: int, ref: str, own: str = "-") -> dict:
    setpriv = require("setpriv")
    env = {"PYTHONPATH": str(ROOT / "src"), "COVE_DAEMON_SOCKET": node.socket, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [
            setpriv,
            f"--reuid={MEMBER}",
            f"--regid={MEMBER}",
            f"--groups={group}",
            "--",
            "/usr/bin/python3",
            "-c",
            AS_MEMBER,
            ref,
            own,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def member_app(app, tmp_path_factory) -> Path:
    """A copy of the hello instance that the member owns (so the daemon lets the member start it)."""
    parent = tmp_path_factory.mktemp("member")
    os.chmod(parent, 0o755)
    copy = parent / "app"
    shutil.copytree(app, copy, symlinks=True, ignore=shutil.ignore_patterns("run"))
    for folder, dirs, files in os.walk(copy):
        for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            os.lchown(name, MEMBER, MEMBER)
    return copy


def test_a_member_cannot_see_or_touch_roots_enclave(node, app, member_app, test_group):
    """Another member's (here root's) enclave is "not found" on every route, and absent from list and events."""
    theirs = node.cove.ok("run", "-d", "--name", "roots-own", "/bin/hello", "600", cwd=app).stdout.strip()
    node.until(theirs, "running")
    setpriv = require("setpriv")
    env = {"PYTHONPATH": str(ROOT / "src"), "COVE_DAEMON_SOCKET": node.socket, "PATH": "/usr/bin:/bin"}
    start = (
        "from cove.daemon.client import Client; import sys; "
        f"print(Client().call('POST', '/enclaves', {{'instance': '{member_app}', 'program': '/bin/hello', "
        "'args': ['600']})['id'])"
    )
    made = subprocess.run(
        [
            setpriv,
            f"--reuid={MEMBER}",
            f"--regid={MEMBER}",
            f"--groups={test_group}",
            "--",
            "/usr/bin/python3",
            "-c",
            start,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    own = made.stdout.strip()
    node.until(own, "running")
    try:
        for ref in (theirs, "roots-own"):
            seen = _as_member(node, test_group, ref, own)
            for route in ("view", "logs", "exec", "kill", "stop", "wait", "rm", "prefix"):
                assert seen[route] == 8, (route, seen)  # 404: exactly as a missing enclave
            assert seen["list"] == [own] and seen["mine"] == own
            assert theirs not in seen["events"] and own in seen["events"]
        assert node.state(theirs)["state"] == "running"  # untouched
        # root sees both, and the member may act on its own
        assert {theirs, own} <= {e["id"] for e in node.api("GET", "/v1/enclaves")[1]}
        acting = _as_member(node, test_group, own, own)
        assert acting["view"] == "served" and acting["rm"] == "served"
    finally:
        node.cove("rm", "-f", theirs)
        node.cove("rm", "-f", own)
