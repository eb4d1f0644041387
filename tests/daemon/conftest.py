"""A real `cove daemon` on a private socket and root, and real instances to start through it."""

from __future__ import annotations

import grp
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import COVE, Cove, require

GROUP = "cove-dtest"  # a group of the tests' own: members may use the test daemon's socket
HELLO = r"""#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <signal.h>
static void term(int s) { (void)s; write(1, "got 15\n", 7); _exit(40); }  /* no stdio in a handler */
int main(int argc, char **argv) {
    if (argc > 1 && argv[1][0] == 't') { signal(SIGTERM, term); argv++; argc--; }
    printf("hello %d\n", argc); fflush(stdout);
    fprintf(stderr, "to stderr\n");
    if (argc > 1) sleep(atoi(argv[1]));
    return argc > 2 ? atoi(argv[2]) : 0;
}
"""


class Node:
    """A daemon process, its socket, and `cove` pointed at it."""

    def __init__(self, base: Path, cove: Cove):
        self.base = base
        self.root = base / "root"
        # a folder every user can pass through, so tests can knock as other users
        self.socket_dir = Path(tempfile.mkdtemp(prefix="cove-dtest-", dir="/tmp"))
        os.chmod(self.socket_dir, 0o755)
        self.socket = str(self.socket_dir / "d.sock")
        self.log = base / "daemon.log"
        self.cove = Cove(Path(cove.env["HOME"]))
        self.cove.env["COVE_DAEMON_SOCKET"] = self.socket
        self.cove.env["COVE_PLATFORM_DIR"] = str(base / "platform")  # a self-certified platform of its own
        self.process: subprocess.Popen | None = None
        self.extra_args: list[str] = []  # more `cove daemon` options (e.g. a small log size)
        with socket.socket() as probe:  # a free port for the metrics
            probe.bind(("127.0.0.1", 0))
            self.metrics = f"127.0.0.1:{probe.getsockname()[1]}"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    COVE,
                    "daemon",
                    "--root",
                    str(self.root),
                    "--socket",
                    self.socket,
                    "--group",
                    GROUP,
                    "--metrics",
                    self.metrics,
                    *self.extra_args,
                ],
                stdout=log,
                stderr=log,
                env=self.cove.env,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                status, _ = self.api("GET", "/v1/version")
                if status == 200:
                    return
            except OSError:
                pass
            assert self.process.poll() is None, f"the daemon exited: {self.log.read_text()[-2000:]}"
            time.sleep(0.05)
        pytest.fail(f"the daemon did not answer: {self.log.read_text()[-2000:]}")

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)

    def raw(self, data: bytes) -> tuple[int, dict | None, bytes]:
        """Send raw bytes; the status, the JSON body (if any) and the whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(self.socket)
            sock.sendall(data)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer:
                    head, _, body = answer.partition(b"\r\n\r\n")
                    length = [
                        int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")
                    ]
                    if length and len(body) >= length[0]:
                        break
        head, _, body = answer.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1]) if head else 0
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        return status, document, answer

    def api(self, method: str, path: str, body=None, headers: dict | None = None):
        connection = http.client.HTTPConnection("localhost", timeout=60)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.socket)
        connection.sock = sock
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        connection.request(method, path, body=data, headers=headers or {"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read()
        connection.close()
        kind = response.getheader("Content-Type", "")
        is_json = kind in ("application/json", "application/problem+json")
        return response.status, (json.loads(raw) if is_json and raw else raw)

    def state(self, ref: str) -> dict:
        status, view = self.api("GET", f"/v1/enclaves/{ref}")
        assert status == 200, view
        return view

    def until(self, ref: str, *states: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = self.state(ref)
            if view["state"] in states:
                return view
            time.sleep(0.05)
        raise AssertionError(f"{ref} never reached {states}: {view}")


@pytest.fixture(scope="session")
def test_group() -> int:
    require("groupadd")
    try:
        return grp.getgrnam(GROUP).gr_gid
    except KeyError:
        subprocess.run(["groupadd", "--system", GROUP], check=True, capture_output=True)
        return grp.getgrnam(GROUP).gr_gid


@pytest.fixture(scope="session")
def hello(tmp_path_factory) -> Path:
    """A static program: prints, sleeps argv[1] seconds, exits argv[2]; with 't' first, exits 40 on SIGTERM."""
    require("gcc")
    folder = tmp_path_factory.mktemp("hello")
    (folder / "hello.c").write_text(HELLO)
    subprocess.run(["gcc", "-static", "-O1", "-o", str(folder / "hello"), str(folder / "hello.c")], check=True)
    return folder / "hello"


def make_hello_instance(cove: Cove, parent: Path, hello: Path, name: str = "app") -> Path:
    cove.ok("new", name, cwd=parent)
    cove.ok("add", "--to", "/bin", str(hello), cwd=parent / name)
    cove.ok("build", cwd=parent / name)
    return parent / name


@pytest.fixture(scope="session")
def app(cove, hello, tmp_path_factory) -> Path:
    return make_hello_instance(cove, tmp_path_factory.mktemp("instances"), hello)


@pytest.fixture(scope="module")
def node(cove, test_group, tmp_path_factory):
    require("bwrap")
    base = Path(str(tmp_path_factory.mktemp("node")))
    node = Node(base, cove)
    node.start()
    yield node
    shut_down(node)


def shut_down(node: Node) -> None:
    """Stop the daemon, end the tests' enclaves and the node's /dev/attestation server, remove the folders."""
    base = node.base
    node.stop()
    # enclaves outlive the daemon by design: end the tests' own
    for folder in (node.root / "enclaves").glob("*"):
        try:
            state = json.loads((folder / "state.json").read_text())
            os.kill(state["pid"], signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass
    try:  # and the node's /dev/attestation server
        from cove.daemon.attestation import request

        os.kill(request(str(node.root / "attestation.sock"), {"op": "status"}, timeout=5)["pid"], signal.SIGTERM)
        time.sleep(0.5)
    except (OSError, ValueError, KeyError):
        pass
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(node.socket_dir, ignore_errors=True)


def node_server_processes(root: Path) -> list[int]:
    """The processes of the node's /dev/attestation server serving root's mount: servers and their mount
    watchers (forks of them, with the same command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"cove.daemon.attestation" in argv and os.fsencode(root / "attestation") in argv:
            found.append(int(entry))
    return found


def parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])
