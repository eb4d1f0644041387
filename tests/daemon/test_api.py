"""The daemon's API under hostile input: 4xx with an RFC 7807 body, never a 500; access by group only."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from cove.daemon import openapi
from tests.conftest import ROOT, require
from tests.daemon.conftest import GROUP

BAD = [
    ("POST", "/v1/enclaves", b"{not json", 400),
    ("POST", "/v1/enclaves", b"[1, 2]", 400),
    ("POST", "/v1/enclaves", b'{"program": "/bin/hello"}', 400),
    ("POST", "/v1/enclaves", b'{"instance": 7, "program": "/bin/hello"}', 400),
    ("POST", "/v1/enclaves", b'{"instance": "relative", "program": "/bin/hello"}', 400),
    ("POST", "/v1/enclaves", b'{"instance": "/nonexistent", "program": "/bin/hello"}', 404),
    ("POST", "/v1/enclaves", b'{"instance": "/tmp", "program": "/bin/hello", "args": [1]}', 400),
    ("POST", "/v1/enclaves", b'{"instance": "/tmp\\u0000x", "program": "/bin/hello"}', 400),
    ("POST", "/v1/enclaves", b'{"instance": "/tmp", "program": "/bin/h", "restart": "maybe"}', 400),
    ("POST", "/v1/enclaves", b'{"instance": "/tmp", "program": "/bin/h", "name": "../../etc"}', 404),
    ("POST", "/v1/enclaves", b'{"instance": "/tmp", "program": "/bin/h", "backend": "vm"}', 422),
    ("GET", "/v1/enclaves/..%2F..%2Fetc", None, 404),
    ("GET", "/v1/enclaves/nobody", None, 404),
    ("GET", "/v1/enclaves/nobody/logs?tail=-1", None, 400),
    ("GET", "/v1/enclaves?all=perhaps", None, 400),
    ("POST", "/v1/enclaves/nobody/stop?timeout=-5", None, 400),
    ("POST", "/v1/enclaves/nobody/stop?timeout=nan", None, 400),
    ("POST", "/v1/enclaves/nobody/kill?signal=SIGNOPE", None, 400),
    ("PUT", "/v1/enclaves", b"{}", 405),
    ("DELETE", "/v1/version", None, 405),
    ("GET", "/v2/enclaves", None, 404),
    ("GET", "/", None, 404),
    ("DELETE", "/v1/images/..", None, 404),
    ("POST", "/v1/enclaves/nobody/exec", b"{}", 400),
    ("POST", "/v1/enclaves/nobody/exec", b'{"argv": []}', 400),
    ("POST", "/v1/enclaves/nobody/exec", b'{"argv": ["/bin/ls"]}', 404),
    ("POST", "/v1/enclaves/nobody/attach", b"{}", 404),
]


@pytest.mark.parametrize("method,path,body,status", BAD, ids=[f"{m} {p} {b!r}"[:60] for m, p, b, _ in BAD])
def test_malformed_requests_are_4xx_problems(node, method, path, body, status):
    code, document = node.api(method, path, body)
    assert code == status, document
    assert document["type"].startswith("urn:cove:daemon:error:") and document["status"] == status
    assert isinstance(document["exit_code"], int) and document["title"]


def test_hostile_bytes_on_the_socket(node):
    cases = [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/enclaves HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
        b"POST /v1/enclaves HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/enclaves HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST /v1/enclaves HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{}",
        b"GET /v1/" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
    ]
    for data in cases:
        status, _, answer = node.raw(data)
        assert 400 <= status < 500, answer[:300]
    assert node.api("GET", "/v1/version")[0] == 200  # and it still serves
    assert b'"level": "error"' not in node.log.read_bytes()  # no fault was logged


def test_openapi_document_lists_every_route(node):
    status, document = node.api("GET", "/v1/openapi.json")
    assert status == 200 and document == json.loads(json.dumps(openapi.document()))
    assert document["openapi"].startswith("3.1")
    for path in (
        "/v1/enclaves",
        "/v1/enclaves/{ref}",
        "/v1/enclaves/{ref}/logs",
        "/v1/enclaves/{ref}/stop",
        "/v1/enclaves/{ref}/kill",
        "/v1/enclaves/{ref}/wait",
        "/v1/images",
        "/v1/images/{id}",
        "/v1/events",
        "/v1/version",
        "/v1/enclaves/{ref}/exec",
    ):
        assert path in document["paths"]
    import schemathesis  # a test extra: it parses and checks the document as an OpenAPI schema

    operations = list(schemathesis.openapi.from_dict(document).get_all_operations())
    assert len(operations) == 15 and all(type(o).__name__ == "Ok" for o in operations)


KNOCK = """
import sys
from cove.daemon.client import Client, DaemonError
try:
    print(len(Client().call("GET", "/enclaves")))
except DaemonError as exc:
    print(exc.exit_code, exc.line)
"""


def _knock(node, uid: int, groups: list[int]) -> str:
    """GET /v1/enclaves as another user, with the thin client under the system Python (standard library only)."""
    setpriv = require("setpriv")
    group_option = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    env = {"PYTHONPATH": str(ROOT / "src"), "COVE_DAEMON_SOCKET": node.socket, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [setpriv, f"--reuid={uid}", f"--regid={uid}", group_option, "--", "/usr/bin/python3", "-c", KNOCK],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_access_only_for_root_and_the_group(node, test_group):
    """Outside the group: refused by the socket's mode, and by the daemon's own check; inside: served."""
    st = os.stat(node.socket)
    assert oct(st.st_mode & 0o777) == "0o660" and st.st_uid == 0 and st.st_gid == test_group
    outsider = _knock(node, 4242, [])
    assert outsider.startswith("6 permission denied") and "`cove` group" in outsider
    assert _knock(node, 4242, [test_group]).isdigit()
    os.chmod(node.socket, 0o666)  # were the socket open to all, the daemon still refuses by SO_PEERCRED
    try:
        refused = _knock(node, 4242, [])
        assert refused == f"6 uid 4242 is neither root nor in the `{GROUP}` group"
    finally:
        os.chmod(node.socket, 0o660)


def test_a_member_may_only_start_its_own_instances(node, app, test_group):
    """The daemon runs as root: a member may not have it import an instance the member does not own."""
    script = KNOCK.replace(
        'call("GET", "/enclaves")', f'call("POST", "/enclaves", {{"instance": "{app}", "program": "/bin/hello"}})'
    )
    setpriv = require("setpriv")
    env = {"PYTHONPATH": str(ROOT / "src"), "COVE_DAEMON_SOCKET": node.socket, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [setpriv, "--reuid=4242", "--regid=4242", f"--groups={test_group}", "--", "/usr/bin/python3", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.stdout.strip().startswith("6 ") and "does not belong to uid 4242" in done.stdout
