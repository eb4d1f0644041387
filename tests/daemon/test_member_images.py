"""What a member of the group may do with images, and the daemon's limits on slow and numerous connections.

A member sees only the images it imported (or ran), removing one drops only its own claim while another
user still has one, and forced removal and prune are root's; bad create requests are 400s, and a member
learns nothing of folders it cannot read; a client that stalls mid-request is disconnected, and a member
over its connection cap is refused while root still gets in.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import COVE, ROOT, require
from tests.daemon.conftest import Node, make_hello_instance, shut_down

MEMBER = 4243
READ_TIMEOUT = 2  # seconds, for this module's daemon (COVE_DAEMON_READ_TIMEOUT)
CAP = 3  # connections per member (COVE_DAEMON_MAX_CONNECTIONS)
ENCLAVES = 2  # enclaves not yet ended per member (COVE_DAEMON_MAX_ENCLAVES)

# the member's side: requests through http.client on the unix socket (standard library only), or, with
# "hold", CAP half-sent request lines held open, one more connection read, then (after a line on stdin)
# a wait for the daemon to close the held ones and one more request
AS_MEMBER = r"""
import http.client, json, socket, sys, time
path = sys.argv[1]

def connect():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    return sock

def call(method, url, body=None):
    conn = http.client.HTTPConnection("localhost", timeout=120)
    conn.sock = connect()
    data = None if body is None else json.dumps(body).encode()
    conn.request(method, url, body=data, headers={"Content-Type": "application/json"})
    answer = conn.getresponse()
    raw = answer.read()
    conn.close()
    return [answer.status, json.loads(raw) if raw else None]

if sys.argv[2] == "hold":
    held = []
    for _ in range(int(sys.argv[3])):
        held.append(connect())
        held[-1].sendall(b"GET /v1/vers")
    extra = connect()
    answer = b""
    while chunk := extra.recv(65536):
        answer += chunk
    print(json.dumps({"over": answer.decode()}), flush=True)
    sys.stdin.readline()
    started = time.monotonic()
    closed = [sock.recv(100) for sock in held]
    print(json.dumps({"closed": [c.decode() for c in closed], "after": time.monotonic() - started,
                      "again": call("GET", "/v1/version")[0]}), flush=True)
else:
    print(json.dumps([call(*request) for request in json.loads(sys.argv[2])]))
"""


def _member(node: Node, group: int, *args: str, **popen) -> subprocess.Popen | subprocess.CompletedProcess:
    setpriv = require("setpriv")
    command = [setpriv, f"--reuid={MEMBER}", f"--regid={MEMBER}", f"--groups={group}", "--"]
    command += ["/usr/bin/python3", "-c", AS_MEMBER, node.socket, *args]
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    if popen:
        return subprocess.Popen(command, env=env, text=True, **popen)
    return subprocess.run(command, env=env, text=True, capture_output=True, timeout=120)


def as_member(node: Node, group: int, *requests: tuple) -> list:
    """[status, document] for each (method, path[, body]) request, sent as the member."""
    done = _member(node, group, json.dumps(requests))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def node(cove, test_group, tmp_path_factory):
    require("bwrap")
    node = Node(Path(str(tmp_path_factory.mktemp("node"))), cove)
    node.cove.env["COVE_DAEMON_READ_TIMEOUT"] = str(READ_TIMEOUT)
    node.cove.env["COVE_DAEMON_MAX_CONNECTIONS"] = str(CAP)
    node.cove.env["COVE_DAEMON_MAX_ENCLAVES"] = str(ENCLAVES)
    node.start()
    yield node
    shut_down(node)


@pytest.fixture(scope="module")
def instances(node, hello, tmp_path_factory) -> dict[str, Path]:
    """root's own ("roots"), one root and the member both have ("shared"), one only the member has ("mine")."""
    parent = tmp_path_factory.mktemp("member-images")
    os.chmod(parent, 0o755)
    made = {name: make_hello_instance(node.cove, parent, hello, name) for name in ("roots", "shared", "mine")}
    for name in ("shared", "mine"):  # the member's copies: the same builds, its own files
        copy = parent / f"{name}-member"
        shutil.copytree(made[name], copy, symlinks=True, ignore=shutil.ignore_patterns("run"))
        for folder, dirs, files in os.walk(copy):
            for entry in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
                os.lchown(entry, MEMBER, MEMBER)
        made[f"{name}-member"] = copy
    return made


def _images(node: Node) -> dict[str, dict]:
    status, images = node.api("GET", "/v1/images")
    assert status == 200
    return {image["name"]: image for image in images}


def _run_as_member(node: Node, group: int, instance: Path) -> None:
    """Start the member's instance (hello exits at once), wait for its end and remove it."""
    [(status, view)] = as_member(
        node, group, ("POST", "/v1/enclaves", {"instance": str(instance), "program": "/bin/hello"})
    )
    assert status == 201, view
    node.until(view["id"], "exited")
    assert node.api("DELETE", f"/v1/enclaves/{view['id']}")[0] == 200


def test_a_member_runs_at_most_its_share_of_enclaves(node, instances, test_group):
    """Each enclave is a supervisor, a sandbox and cgroups on the node: a member's running ones are capped
    (429 TooManyEnclaves, nothing registered); ended ones do not count, and root is not capped."""
    start = (
        "POST",
        "/v1/enclaves",
        {"instance": str(instances["mine-member"]), "program": "/bin/hello", "args": ["600"]},
    )
    answers = as_member(node, test_group, *[start] * (ENCLAVES + 1))
    made = [view["id"] for status, view in answers if status == 201]
    try:
        assert len(made) == ENCLAVES, answers
        status, problem = answers[-1]
        assert status == 429 and problem["kind"] == "TooManyEnclaves" and problem["exit_code"] == 6, problem
        assert "COVE_DAEMON_MAX_ENCLAVES" in problem["detail"]
        mine = [e["id"] for e in as_member(node, test_group, ("GET", "/v1/enclaves?all=true"))[0][1]]
        assert sorted(mine) == sorted(made), "a refused start left an enclave"
        roots = [
            node.cove.ok("run", "-d", "/bin/hello", "600", cwd=instances["roots"]).stdout.strip() for _ in range(3)
        ]
        made += roots  # root is not capped
        node.api("POST", f"/v1/enclaves/{made[0]}/kill?signal=KILL")
        node.until(made[0], "exited")  # an ended enclave no longer counts
        [(status, view)] = as_member(node, test_group, start)
        assert status == 201, view
        made.append(view["id"])
    finally:
        for ident in made:
            node.api("DELETE", f"/v1/enclaves/{ident}?force=true")


def test_a_member_sees_and_removes_only_its_own_images(node, instances, test_group):
    node.cove.ok("run", "/bin/hello", cwd=instances["roots"])
    node.cove.ok("run", "/bin/hello", cwd=instances["shared"])
    _run_as_member(node, test_group, instances["shared-member"])
    _run_as_member(node, test_group, instances["mine-member"])
    every = _images(node)
    assert set(every) == {"roots", "shared", "mine"}
    roots, shared, mine = every["roots"]["id"], every["shared"]["id"], every["mine"]["id"]

    seen, forced, plain, pruned, prefix = as_member(
        node,
        test_group,
        ("GET", "/v1/images"),
        ("DELETE", f"/v1/images/{roots}?force=true"),
        ("DELETE", f"/v1/images/{roots}"),
        ("POST", "/v1/images/prune"),
        ("DELETE", f"/v1/images/{roots[:12]}"),
    )
    assert seen[0] == 200 and sorted(i["name"] for i in seen[1]) == ["mine", "shared"]
    assert all(i["enclaves"] == 0 for i in seen[1])
    assert forced[0] == 403 and forced[1]["type"] == "urn:cove:daemon:error:Forbidden" and forced[1]["exit_code"] == 6
    assert pruned[0] == 403 and pruned[1]["kind"] == "Forbidden"
    for answer in (plain, prefix):  # another's image: exactly as a missing one
        assert answer[0] == 404 and answer[1]["kind"] == "NotFound", answer
    assert set(_images(node)) == {"roots", "shared", "mine"}  # nothing went

    # the shared image: only the member's claim goes; its own: the image goes with its last claim
    drop_shared, drop_mine, after = as_member(
        node, test_group, ("DELETE", f"/v1/images/{shared}"), ("DELETE", f"/v1/images/{mine}"), ("GET", "/v1/images")
    )
    assert drop_shared == [200, {"id": shared, "blobs_removed": 0, "bytes_freed": 0}]
    assert drop_mine[0] == 200 and drop_mine[1]["id"] == mine
    assert after == [200, []]
    assert set(_images(node)) == {"roots", "shared"}
    assert not (node.root / "store" / "images" / mine).exists()

    # running it again claims it again (the import cache answers: the claim is still recorded)
    _run_as_member(node, test_group, instances["shared-member"])
    [seen] = as_member(node, test_group, ("GET", "/v1/images"))
    assert [i["name"] for i in seen[1]] == ["shared"]
    record = json.loads((node.root / "store" / "images" / shared / "image.json").read_text())
    assert sorted(record["users"]) == [0, MEMBER]

    # root still removes anything, by force too
    assert node.api("DELETE", f"/v1/images/{shared}?force=true")[0] == 200
    assert set(_images(node)) == {"roots"}


@pytest.mark.parametrize(
    "body, detail",
    [
        ({"signer": "zz"}, "signer must be 64 hex digits"),
        ({"signer": "ab" * 31 + " f"}, "signer must be 64 hex digits"),
        ({"instance": "/tmp/" + "a" * 300 + "/app"}, "longer than 255 bytes"),
        ({"instance": "/tmp/\ud800/app"}, None),  # a lone surrogate: no file name
    ],
)
def test_bad_create_requests_are_400(node, instances, body, detail):
    request = {"instance": str(instances["roots"]), "program": "/bin/hello", **body}
    status, problem = node.api("POST", "/v1/enclaves", json.dumps(request).encode())
    assert status == 400 and problem["kind"] == "InvalidRequest", problem
    assert detail is None or detail in problem["detail"]
    assert '"fault"' not in node.log.read_text()


def test_a_body_refused_unread_is_never_taken_for_the_next_request(node):
    """A request refused before its body was read (a chunked body here) closes the connection: the body's
    bytes, whatever they say, are not parsed as a next request on it."""
    smuggled = b"GET /v1/version HTTP/1.1\r\nHost: d\r\n\r\n"
    head = b"POST /v1/enclaves HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(READ_TIMEOUT * 5)
        sock.connect(node.socket)
        sock.sendall(head + smuggled)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1 ") == 1, answer


def test_a_member_learns_nothing_of_folders_it_cannot_read(node, instances, test_group):
    """Root's instance (a cove.toml there), a folder without one, and nothing at all: the same answer."""
    roots = instances["roots"]
    paths = [roots, roots / "image", roots.parent / "nothing-here", roots / "cove.toml"]
    answers = as_member(
        node,
        test_group,
        *[("POST", "/v1/enclaves", {"instance": str(path), "program": "/bin/hello"}) for path in paths],
    )
    assert all(status == 403 for status, _ in answers), answers
    shown = {problem["detail"].replace(str(path), "PATH") for path, (_, problem) in zip(paths, answers)}
    assert shown == {
        "PATH is missing or does not belong to uid 4243: the instance folder, its image/, build/ and cove.toml "
        "must be that user's own, and none a symbolic link"
    }


def test_a_stalled_request_is_cut_and_a_member_over_the_cap_is_refused(node, test_group):
    """CAP half-sent request lines as the member: the next member connection gets a 503 problem while root
    gets in (with more connections held than the cap); all the stalled ones are closed after the timeout, and
    so is one that sends a byte of its request line every 0.3 s (the deadline is for the whole request)."""
    trickled: list[float] = []

    def trickle() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(node.socket)
            started = time.monotonic()
            try:
                for byte in b"GET /v1/version HTTP/1.1" * 4:
                    sock.sendall(bytes([byte]))
                    time.sleep(0.3)
            except (BrokenPipeError, ConnectionResetError):
                trickled.append(time.monotonic() - started)

    trickler = threading.Thread(target=trickle)
    trickler.start()
    roots_held = []
    for _ in range(CAP + 1):  # root is not capped
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(node.socket)
        sock.sendall(b"GET /v1/ver")
        roots_held.append(sock)
    body_stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # whole headers, 2 of 10 body bytes
    body_stalled.settimeout(30)
    body_stalled.connect(node.socket)
    body_stalled.sendall(
        b"POST /v1/enclaves HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{}"
    )
    roots_held.append(body_stalled)
    member = _member(node, test_group, "hold", str(CAP), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        over = json.loads(member.stdout.readline())["over"]
        head, _, body = over.partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 503"), over
        problem = json.loads(body)
        assert problem["type"] == "urn:cove:daemon:error:TooManyConnections" and problem["status"] == 503
        assert problem["detail"] == f"uid {MEMBER} already has {CAP} connections open to the daemon; close some"
        assert node.api("GET", "/v1/version")[0] == 200  # root still gets in
        member.stdin.write("go\n")
        member.stdin.flush()
        ended = json.loads(member.stdout.readline())
        assert ended["closed"] == [""] * CAP  # the daemon hung up: no answer to half a request line
        assert ended["after"] < READ_TIMEOUT + 10 and ended["again"] == 200  # and their slots are free again
        started = time.monotonic()
        assert [sock.recv(100) for sock in roots_held] == [b""] * (CAP + 2)  # root's stalls too, the body's
        assert time.monotonic() - started < READ_TIMEOUT + 10
        assert '"path": "/v1/enclaves", "status": 408' in node.log.read_text()
        trickler.join()
        assert trickled and trickled[0] < READ_TIMEOUT + 3, trickled
    finally:
        member.kill()
        member.wait()
        for sock in roots_held:
            sock.close()


@pytest.mark.parametrize(
    "name, value",
    [("COVE_DAEMON_READ_TIMEOUT", "0"), ("COVE_DAEMON_READ_TIMEOUT", "nan"), ("COVE_DAEMON_MAX_CONNECTIONS", "-1e9")],
)
def test_a_bad_limit_stops_the_start_with_one_line(tmp_path, name, value):
    """Checked before the daemon makes anything: one line, exit 2, no folder, no socket."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVE_")}
    env[name] = value
    root, sock = tmp_path / "root", tmp_path / "d.sock"
    done = subprocess.run(
        [COVE, "daemon", "--root", str(root), "--socket", str(sock)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stderr == (
        f"cove: error: {name}={value!r} is not a positive number (unset it, or give a number up to 1e6)\n"
    )
    assert not root.exists() and not sock.exists()
