"""`cove exec` against the review's attacks: a reused pid, programs that leave their group, endless output."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from cove.daemon import execstream
from cove.runtime.procfs import process_start
from cove.daemon.server import children, sandbox_init
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def sleeper(node, app):
    """A running hello enclave (sleeping); its id and its program's host pid."""
    ident = node.cove.ok("run", "-d", "/bin/hello", "600", cwd=app).stdout.strip()
    view = node.until(ident, "running")
    deadline = time.monotonic() + 20
    while not (program := children(sandbox_init(view["supervisor_pid"]) or 0)):
        assert time.monotonic() < deadline, "the enclave's program never started"
        time.sleep(0.05)
    yield ident, program[0]
    node.cove("rm", "-f", ident)


def _helper(pid: int, spec: dict) -> subprocess.CompletedProcess:
    """Run the exec helper as the daemon does: the spec over a socket pair, never on the command line."""
    parent, child = socket.socketpair()
    with parent, child:
        process = subprocess.Popen(
            [sys.executable, "-m", "cove.daemon.execin", str(pid), str(child.fileno())],
            pass_fds=(child.fileno(),),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        child.close()
        parent.sendall(json.dumps(spec).encode())
        parent.shutdown(socket.SHUT_WR)
        out, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_a_reused_pid_is_refused(sleeper):
    """The helper checks the program's start time through one /proc/PID descriptor: another start, no entry."""
    _, pid = sleeper
    spec = {
        "argv": ["/bin/hello"],
        "uid": 65534,
        "gid": 65534,
        "cwd": "/",
        "env": {},
        "secret_env": [],
        "max_open_files": 64,
        "seccomp": "",
        "start": process_start(pid) + 1,
    }  # (as if pid were reused)
    done = _helper(pid, spec)
    assert done.returncode == 125, done
    assert done.stderr.strip() == (
        f"cove: error: cannot enter the enclave: its program is gone (process {pid} is no longer the enclave's program)"
    )
    assert "hello" not in done.stdout


@pytest.mark.parametrize("head", [struct.pack(">B3sI", 0, b"\x01\0\0", 0), struct.pack(">B3sI", 1, b"\0\0\xff", 2)])
def test_frame_pad_bytes_must_be_zero(head):
    """docs/formats/daemon-api.md: the three bytes after the kind are zero; anything else is refused."""
    with pytest.raises(execstream.ProtocolError, match="pad bytes"):
        execstream.read_frame(io.BytesIO(head + b"ab"))
    assert execstream.read_frame(io.BytesIO(execstream.frame(1, b"ab"))) == (1, b"ab")


def test_the_trace_file_is_never_a_followed_link(tmp_path, monkeypatch):
    """A root daemon's COVE_TRACE_START=/tmp/... must not append to whatever a planted link points at."""
    from cove import trace

    target = tmp_path / "victim"
    target.write_text("precious\n")
    (tmp_path / "trace").symlink_to(target)
    monkeypatch.setenv(trace.ENV, str(tmp_path / "trace"))
    trace.emit("probe", 1.0, 2.0)  # never fails its caller
    assert target.read_text() == "precious\n"
    monkeypatch.setenv(trace.ENV, str(tmp_path / "real"))
    trace.emit("probe", 1.0, 2.0)
    assert (tmp_path / "real").read_text().startswith("cove-trace ")
    assert (tmp_path / "real").stat().st_mode & 0o777 == 0o600


PEER = """
import os, socket, sys
from cove.daemon.client import Client, DaemonError
group = int(sys.argv[1])
os.setgroups([])
os.setresgid(4242, 4242, 0)
os.setresuid(4242, 4242, 0)  # (the saved uid stays root, to take the group back below)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(os.environ["COVE_DAEMON_SOCKET"])  # no group at connect() ...
os.setresuid(4242, 0, 0)
os.setgroups([group])  # ... only afterwards: the daemon must judge by what the kernel saved at connect()
os.setresuid(4242, 4242, 0)
sock.sendall(b"GET /v1/enclaves HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
answer = b""
while chunk := sock.recv(65536):
    answer += chunk
print(answer.split(b" ")[1].decode())
"""


def test_membership_is_judged_at_connect(node, test_group):
    os.chmod(node.socket, 0o666)  # (the socket's mode is the first gate; this is the daemon's own check)
    try:
        done = subprocess.run(
            [sys.executable, "-c", PEER, str(test_group)],
            capture_output=True,
            text=True,
            env=dict(node.cove.env, PYTHONPATH=str(ROOT / "src")),
            timeout=60,
        )
    finally:
        os.chmod(node.socket, 0o660)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "403"


def test_deeply_nested_json_body_is_a_400(node):
    status, document = node.api("POST", "/v1/enclaves", b'{"a": ' + b"[" * 50000 + b"]" * 50000 + b"}")
    assert status == 400 and document["kind"] == "InvalidRequest", document
