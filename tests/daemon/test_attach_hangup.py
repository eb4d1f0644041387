"""An attached `cove run` client that hangs up while its program is silent leaves its enclave listed.

The daemon noticed a client's leaving only when it next wrote to it: a program silent until its end
was followed to the end and removed, exit code and log with it, against the API's word ("stays listed
until `cove rm`"). The daemon now watches the client's socket for its hang-up while it waits.
"""

from __future__ import annotations

import json
import socket
import struct
import time

from cove.daemon.client import OUTPUT, STARTED
from tests.daemon.test_attach import attach, read_frames


def attach_requests(node) -> list[dict]:
    lines = [json.loads(line) for line in node.log.read_text().splitlines() if '"event": "request"' in line]
    return [r for r in lines if (r["method"], r["path"]) == ("POST", "/v1/enclaves")]


def test_a_client_that_hangs_up_while_the_program_is_silent_leaves_it_listed(node, app):
    before = len(attach_requests(node))
    head, sock = attach(node, {"instance": str(app), "program": "/bin/hello", "args": ["2", "4"]})
    with sock:  # the started frame, then the program's first (and only) output: then it is silent for 2 s
        assert head.startswith(b"HTTP/1.1 101 ")
        kinds = []
        while OUTPUT not in kinds:
            kind, _, size = struct.unpack(">B3sI", sock.recv(8, socket.MSG_WAITALL))
            payload = sock.recv(size, socket.MSG_WAITALL)
            if kind == STARTED:
                ident = json.loads(payload)["id"]
            kinds.append(kind)
        assert kinds[0] == STARTED
    try:
        view = node.until(ident, "exited")
        deadline = time.monotonic() + 30
        while len(attach_requests(node)) == before:  # the daemon's request has returned: no removal to come
            assert time.monotonic() < deadline, "the attach request never ended"
            time.sleep(0.05)
        assert attach_requests(node)[-1]["status"] == 499
        status, view = node.api("GET", f"/v1/enclaves/{ident}")
        assert status == 200, view
        assert (view["state"], view["exit_code"]) == ("exited", 4)
        assert "hello 3" in node.cove.ok("logs", ident).stdout
    finally:
        node.cove("rm", "-f", ident)


def test_a_client_that_shuts_only_its_sending_side_is_followed_to_the_end(node, app):
    head, sock = attach(node, {"instance": str(app), "program": "/bin/hello", "args": ["1", "5"]})
    with sock:
        assert head.startswith(b"HTTP/1.1 101 ")
        sock.shutdown(socket.SHUT_WR)
        frames = read_frames(sock)
    ended = json.loads(frames[-1][1])
    assert (frames[0][0], ended["exit_code"]) == (STARTED, 5)
    status, _ = node.api("GET", f"/v1/enclaves/{ended['id']}")
    assert status == 404  # removed at its end, as an attached run is
