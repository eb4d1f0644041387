"""The resident `create` (cove.oci.resident): the same containers as the in-process path, and its abuse.

Each test runs its own helper on its own socket (COVE_RUNTIME_RESIDENT), so
killing it touches nobody else's. "The engine" here is a small subreaper
that calls cove-runtime as conmon does and reaps the container's pid.
"""

from __future__ import annotations

import json
import marshal
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.oci.helpers import RUNTIME, SPEC, no_leftovers, one_line, runtime, state, write_spec

ENGINE = """
import ctypes, json, os, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER, as conmon and containerd's shims
runtime, root, bundle, ident, out, signal_name = sys.argv[1:7]
pid_file = out + ".pid"
with open(out, "w") as stream:
    made = subprocess.run([runtime, "--root", root, "create", "--bundle", bundle, "--pid-file", pid_file, ident],
                          stdout=stream, stderr=stream)
if made.returncode:
    print(json.dumps({"create": made.returncode}))
    sys.exit()
pid = int(open(pid_file).read())
if signal_name.startswith("early:"):  # before `start`, once the container's process has loaded
    time.sleep(1)
    subprocess.run([runtime, "--root", root, "kill", ident, signal_name[6:]], check=True)
    signal_name = ""
else:
    subprocess.run([runtime, "--root", root, "start", ident], check=True)
if signal_name:
    time.sleep(0.5)
    subprocess.run([runtime, "--root", root, "kill", ident, signal_name], check=True)
_, status = os.waitpid(pid, 0)
print(json.dumps({"pid": pid, "status": status}))
"""


def _peer_pid(path: str) -> int | None:
    """The pid of the process listening on path (SO_PEERCRED), None if nobody listens."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    except OSError:
        return None
    return int.from_bytes(cred[:4], sys.byteorder)


def _wait_for(path: str, old: int | None = None) -> int:
    for _ in range(600):
        pid = _peer_pid(path)
        if pid is not None and pid != old:
            return pid
        time.sleep(0.05)
    raise AssertionError("the resident helper did not start")


def _start_helper(monkeypatch, **env: str) -> tuple[str, int]:
    """A helper of this test's own (a short socket path: AF_UNIX allows 107 bytes): its socket and pid."""
    folder = tempfile.mkdtemp(prefix="cove-res-")
    path = os.path.join(folder, "sock")
    monkeypatch.setenv("COVE_RUNTIME_RESIDENT", path)
    subprocess.Popen(
        [sys.executable, "-I", "-m", "cove.oci.resident", "serve", path],
        start_new_session=True,
        env=dict(os.environ, **env),
    )
    return path, _wait_for(path)


def _stop_helper(path: str) -> None:
    folder = os.path.dirname(path)
    for _ in range(3):  # whichever helper holds the socket now (a test may have had another one started)
        found = _peer_pid(path)
        if found is None:
            break
        os.kill(found, signal.SIGKILL)
        time.sleep(0.1)
    subprocess.run(["rm", "-rf", folder])


@pytest.fixture
def helper(monkeypatch):
    """A helper of this test's own: its socket and pid. Stopped after."""
    path, pid = _start_helper(monkeypatch)
    yield path, pid
    _stop_helper(path)


def _gone(pid: int) -> bool:
    """pid has ended (a zombie of this test's Popen counts as ended)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def _engine(root: Path, bundle: Path, ident: str, out: Path, signal_name: str = "") -> dict:
    done = subprocess.run(
        [sys.executable, "-c", ENGINE, RUNTIME, str(root), str(bundle), ident, str(out), signal_name],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _record(root: Path, ident: str) -> dict:
    return marshal.loads((root / ident / "state.marshal").read_bytes())


def _mode(resident: bool, monkeypatch) -> None:
    if not resident:
        monkeypatch.setenv("COVE_RUNTIME_RESIDENT", "0")


LOOP = ["/bin/sh", "-c", "trap 'exit 9' TERM; trap 'exit 5' USR1; echo up; while :; do sleep 0.1; done"]


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "in-process"])
@pytest.mark.parametrize(
    "args, signal_name, expect",
    [
        (None, "", ("exited", 7)),  # the program's exit code
        (LOOP, "TERM", ("exited", 9)),  # relayed to the program, which traps it
        (LOOP, "USR1", ("exited", 5)),  # the same (the helper's own use of USR1 is not inherited)
        (LOOP, "KILL", ("signaled", 9)),  # the container's process is killed: the engine sees the signal
    ],
    ids=["exit-code", "term", "usr1", "kill"],
)
def test_the_engine_sees_the_same_container_either_way(
    helper, bundle, tmp_path, monkeypatch, resident, args, signal_name, expect
):
    _mode(resident, monkeypatch)
    if args:
        spec = json.loads(json.dumps(SPEC))
        spec["process"]["args"] = args
        write_spec(bundle, spec)
    root, out = tmp_path / "state", tmp_path / "out"
    seen = _engine(root, bundle, "r", out, signal_name)
    status = seen["status"]
    kind = ("signaled", os.WTERMSIG(status)) if os.WIFSIGNALED(status) else ("exited", os.WEXITSTATUS(status))
    assert kind == expect, out.read_text()
    words = out.read_text().split()
    assert words[0] == ("up" if args else "hello-from-enclave"), words
    record = _record(root, "r")
    assert ("enclave_pid" in record) == resident  # it went the way it was meant to
    assert record["pid"] == seen["pid"]
    assert state(root, "r")["status"] == "stopped"
    assert runtime(root, "delete", "r").returncode == 0
    no_leftovers(root, "r")
    assert not os.path.exists(f"/proc/{record.get('enclave_pid', record['pid'])}/cmdline")


FAKE_NODE = """
import os, socket, sys
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen(8)
while True:
    conn, _ = server.accept()
    conn.recv(4096)
    conn.sendall(b'{"ok": true}\\n')
    conn.close()
"""


def test_a_node_service_that_answered_the_helper_once_is_asked_again_per_container(bundle, tmp_path, monkeypatch):
    """The helper's loading must not settle which /dev/attestation server a container uses: a node service that
    answered then and is gone now would fail every container (found by bench/oci.py, whose node service ends)."""
    node = tmp_path / "node"
    node.mkdir()
    fake = subprocess.Popen([sys.executable, "-c", FAKE_NODE, str(node / "attestation.sock")])
    try:
        for _ in range(200):
            if (node / "attestation.sock").exists():
                break
            time.sleep(0.05)
        path, _ = _start_helper(monkeypatch, COVE_NODE_ROOT=str(node))
    finally:
        fake.kill()
        fake.wait()
    (node / "attestation.sock").unlink()
    try:
        monkeypatch.setenv("COVE_NODE_ROOT", str(node))  # no node service there now: a server of its own
        root, out = tmp_path / "state", tmp_path / "out"
        seen = _engine(root, bundle, "n", out)
        assert os.WIFEXITED(seen["status"]) and os.WEXITSTATUS(seen["status"]) == 7, out.read_text()
        assert out.read_text().split() == ["hello-from-enclave", "cove"]
        assert "enclave_pid" in _record(root, "n")
        assert runtime(root, "delete", "n").returncode == 0
    finally:
        _stop_helper(path)


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "in-process"])
def test_a_tampered_image_is_refused_with_the_same_line(helper, bundle, tmp_path, monkeypatch, resident):
    _mode(resident, monkeypatch)
    (bundle / "rootfs" / "bin" / "cat").write_bytes(b"#!/bin/sh\necho evil\n")
    root = tmp_path / "state"
    result = runtime(root, "create", "--bundle", str(bundle), "--pid-file", str(tmp_path / "pid"), "t")
    assert result.returncode == 3, result.stderr
    assert "bin/cat" in one_line(result)
    assert not (tmp_path / "pid").exists()
    no_leftovers(root, "t")


def test_kill_9_of_the_helper_changes_nothing_and_the_next_create_falls_back(helper, bundle, tmp_path):
    path, pid = helper
    root = tmp_path / "state"
    out = open(tmp_path / "out", "w")
    assert runtime(root, "create", "--bundle", str(bundle), "a", stdout=out, stderr=out).returncode == 0
    assert "enclave_pid" in _record(root, "a")
    assert len(os.listdir(f"/proc/{pid}/task")) == 1  # single-threaded: its forks inherit no lock held elsewhere
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if _gone(pid):
            break
        time.sleep(0.02)
    assert runtime(root, "start", "a").returncode == 0  # the worker and the container's process go on
    for _ in range(600):
        if state(root, "a")["status"] == "stopped":
            break
        time.sleep(0.05)
    assert (tmp_path / "out").read_text().split()[0] == "hello-from-enclave"
    # no helper answers: in-process, and a new helper is started for the next create
    assert runtime(root, "create", "--bundle", str(bundle), "b", stdout=out, stderr=out).returncode == 0
    assert "enclave_pid" not in _record(root, "b")
    _wait_for(path, old=pid)
    assert runtime(root, "create", "--bundle", str(bundle), "c", stdout=out, stderr=out).returncode == 0
    assert "enclave_pid" in _record(root, "c")
    for ident in ("a", "b", "c"):
        assert runtime(root, "delete", "--force", ident).returncode == 0
        no_leftovers(root, ident)


def test_kill_9_of_the_worker_ends_the_container(helper, bundle, tmp_path):
    spec = json.loads(json.dumps(SPEC))
    spec["process"]["args"] = LOOP
    write_spec(bundle, spec)
    root = tmp_path / "state"
    assert runtime(root, "create", "--bundle", str(bundle), "w", stdout=subprocess.DEVNULL).returncode == 0
    record = _record(root, "w")
    worker = int(open(f"/proc/{record['enclave_pid']}/stat").read().rsplit(")", 1)[1].split()[1])
    assert runtime(root, "start", "w").returncode == 0
    os.kill(worker, signal.SIGKILL)
    for _ in range(200):
        if state(root, "w")["status"] == "stopped" and not os.path.exists(f"/proc/{record['enclave_pid']}/cmdline"):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the stub or the container's process outlived the worker")
    assert runtime(root, "delete", "w").returncode == 0
    no_leftovers(root, "w")


def _as_nobody(path: str, request: bytes) -> bytes:
    """Connect as uid 65534 and send request; the helper's first answer (b"" if none)."""
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(path)
                sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(12))])
                os.write(writer, sock.recv(4096))
        except BaseException as exc:  # noqa: BLE001
            os.write(writer, f"failed {exc}".encode())
        os._exit(0)
    os.close(writer)
    answer = os.read(reader, 4096)
    os.waitpid(child, 0)
    os.close(reader)
    return answer


def _request(path: str, payload: bytes, fds: tuple[int, ...] = (0, 1, 2), framed: bool = True) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(path)
        data = len(payload).to_bytes(4, "big") + payload if framed else payload
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, b"".join(fd.to_bytes(4, "little") for fd in fds))])
        sock.shutdown(socket.SHUT_WR)
        return sock.recv(4096)


def _fields(tmp_path: Path, **changes: str) -> list[str]:
    from cove.oci import resident

    fields = {
        "root": str(tmp_path / "state"),
        "id": "x",
        "bundle": str(tmp_path / "bundle"),
        "cwd": "/",
        "console": "",
        "node": "",
        "python": sys.executable,
        "package": resident.package_dir(),
        "umask": "22",
    }
    fields.update(changes)
    return list(fields.values())


def test_hostile_callers_and_requests_are_refused_and_the_helper_serves_on(helper, bundle, tmp_path):
    from cove.oci import resident

    path, pid = helper
    assert oct(os.stat(path).st_mode & 0o777) == "0o600" and os.stat(path).st_uid == 0
    assert _as_nobody(path, b"x").startswith(b"failed")  # the socket's mode keeps others out
    os.chmod(path, 0o666)
    os.chmod(os.path.dirname(path), 0o711)
    assert _as_nobody(path, resident.encode_request(_fields(tmp_path), [])) == b"retry not root\n"  # SO_PEERCRED
    os.chmod(path, 0o600)
    os.chmod(os.path.dirname(path), 0o700)
    good = resident.encode_request(_fields(tmp_path), [])[4:]
    bad = {
        "garbage": _request(path, b"\xff" * 64),
        "oversized": _request(path, (1 << 30).to_bytes(4, "big"), framed=False),
        "short": _request(path, (100).to_bytes(4, "big") + b"abc", framed=False),
        "no-fds": _request(path, good, fds=()),
        "relative": _request(path, resident.encode_request(_fields(tmp_path, bundle="bundle"), [])[4:]),
        "env": _request(path, resident.encode_request(_fields(tmp_path), ["NOEQUALS"])[4:]),
        "umask": _request(path, resident.encode_request(_fields(tmp_path, umask="9z"), [])[4:]),
    }
    for name, answer in bad.items():
        assert answer.startswith(b"error 2 resident create: "), (name, answer)
        assert answer.count(b"\n") == 1, (name, answer)
    assert not (tmp_path / "state" / "x").exists()
    # another version's client (one loaded before an upgrade; /1 had no UMASK): declined, never refused
    old = b"COVE-OCI-RESIDENT/1\0" + b"".join(os.fsencode(item) + b"\0" for item in _fields(tmp_path)[:8])
    later = good.replace(resident.VERSION, b"COVE-OCI-RESIDENT/9")
    assert (_request(path, old), _request(path, later)) == (b"retry version\n", b"retry version\n")
    # another checkout's client: declined, the helper stays
    other = resident.encode_request(_fields(tmp_path, package="/elsewhere/cove"), [])[4:]
    assert _request(path, other) == b"retry other\n"
    assert _peer_pid(path) == pid
    root = tmp_path / "state"
    assert runtime(root, "create", "--bundle", str(bundle), "y", stdout=subprocess.DEVNULL).returncode == 0
    assert runtime(root, "delete", "--force", "y").returncode == 0


def test_a_socket_root_does_not_hold_is_never_used(bundle, tmp_path, monkeypatch):
    """A listener of another uid at the configured path gets nothing: create checks the peer and goes in-process."""
    folder = tempfile.mkdtemp(prefix="cove-res-")
    os.chown(folder, 65534, 65534)
    path = os.path.join(folder, "sock")
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(reader)
        os.setgid(65534)
        os.setuid(65534)
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(path)
            os.chmod(path, 0o666)
            server.listen(4)
            os.write(writer, b"r")
            conn, _ = server.accept()
            conn.settimeout(5)
            try:
                got = conn.recv(4096)
            except OSError:
                got = b""
            os.write(writer, b"got" if got else b"nothing")
        os._exit(0)
    os.close(writer)
    try:
        assert os.read(reader, 1) == b"r"
        monkeypatch.setenv("COVE_RUNTIME_RESIDENT", path)
        root = tmp_path / "state"
        assert runtime(root, "create", "--bundle", str(bundle), "z", stdout=subprocess.DEVNULL).returncode == 0
        assert "enclave_pid" not in _record(root, "z")
        assert os.read(reader, 16) == b"nothing"
        assert runtime(root, "delete", "--force", "z").returncode == 0
    finally:
        os.waitpid(child, 0)
        subprocess.run(["rm", "-rf", folder])


CLIENT_IMPORTS = """
import sys
from cove.oci import cli
code = cli.main(sys.argv[1:])
print(code, ' '.join(sorted(sys.modules)), file=open(sys.argv[0] + '.modules', 'w'))
"""


def test_the_client_loads_no_verifier_and_no_slow_module(helper, bundle, tmp_path):
    root = tmp_path / "state"
    script = tmp_path / "client.py"
    script.write_text(CLIENT_IMPORTS)
    with open(tmp_path / "err", "w") as err:  # the container's process keeps the streams it is given
        done = subprocess.run(
            [sys.executable, str(script), "--root", str(root), "create", "--bundle", str(bundle), "m"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            timeout=60,
        )
    assert done.returncode == 0, (tmp_path / "err").read_text()
    code, *modules = (tmp_path / "client.py.modules").read_text().split()
    try:
        assert code == "0" and "enclave_pid" in _record(root, "m")
        cove = [m for m in modules if m.startswith("cove")]
        assert cove == ["cove", "cove.oci", "cove.oci.cli", "cove.oci.resident"], cove
        assert [m for m in ("json", "re", "enum", "signal", "socket", "typing", "pathlib") if m in modules] == []
    finally:
        assert runtime(root, "delete", "--force", "m").returncode == 0
    no_leftovers(root, "m")


def test_a_helper_whose_code_changed_starts_again_in_place(helper, bundle, tmp_path):
    """Changed code on disk is never served: the helper re-executes itself (same pid, so still outside any
    engine's tree, where no create could start a new one) and the declined create runs in-process."""
    from cove.oci import create, resident

    path, pid = helper
    os.utime(create.__file__)  # a new mtime: what an upgrade or an edit leaves
    newer = resident.encode_request([*_fields(tmp_path), "a field of a later format"], [])[4:]
    assert _request(path, newer) == b"retry stale\n"  # not `error`: this helper's code cannot judge that format
    for _ in range(600):
        if _peer_pid(path) == pid and os.stat(path).st_ino:
            break
        time.sleep(0.05)
    assert _peer_pid(path) == pid
    root = tmp_path / "state"
    for _ in range(100):  # the socket of the re-executed helper is a new one: wait until it serves
        assert runtime(root, "create", "--bundle", str(bundle), "s", stdout=subprocess.DEVNULL).returncode == 0
        through = "enclave_pid" in _record(root, "s")
        assert runtime(root, "delete", "--force", "s").returncode == 0
        if through:
            break
        time.sleep(0.1)
    assert through


def test_a_helper_that_hangs_up_without_an_answer_means_the_in_process_path(bundle, tmp_path, monkeypatch):
    """What a client sees when the helper is killed with connections not yet taken (or a worker dies before
    it answers): end of file. The container is made in-process, as if no helper had answered."""
    folder = tempfile.mkdtemp(prefix="cove-res-")
    path = os.path.join(folder, "sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen(4)
        monkeypatch.setenv("COVE_RUNTIME_RESIDENT", path)
        root = tmp_path / "state"
        child = os.fork()
        if child == 0:  # the hang-up, from another process, while the client waits for its answer
            conn, _ = server.accept()
            conn.recv(1 << 16)
            os._exit(0)
        try:
            made = runtime(root, "create", "--bundle", str(bundle), "h", stdout=subprocess.DEVNULL)
        finally:
            os.waitpid(child, 0)
    try:
        assert made.returncode == 0, made.stderr
        assert "enclave_pid" not in _record(root, "h")
        assert runtime(root, "delete", "--force", "h").returncode == 0
        no_leftovers(root, "h")
    finally:
        subprocess.run(["rm", "-rf", folder])


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "in-process"])
def test_a_signal_before_start_ends_the_container_either_way(helper, bundle, tmp_path, monkeypatch, resident):
    """USR1 before `start` (default action: the end, seen as that signal) reaches a process with no handler of
    the helper's (which restarts itself on USR1: a container's process that kept it would exit 0 instead)."""
    _mode(resident, monkeypatch)
    root, out = tmp_path / "state", tmp_path / "out"
    seen = _engine(root, bundle, "u", out, "early:USR1")
    assert os.WIFSIGNALED(seen["status"]) and os.WTERMSIG(seen["status"]) == signal.SIGUSR1, seen
    assert runtime(root, "delete", "u").returncode == 0
    no_leftovers(root, "u")


UMASK_ENGINE = "import os, sys; os.umask(0o002); os.execv(sys.argv[1], sys.argv[1:])"


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "in-process"])
def test_the_container_gets_the_callers_umask_either_way(helper, bundle, tmp_path, monkeypatch, resident):
    _mode(resident, monkeypatch)
    spec = json.loads(json.dumps(SPEC))
    spec["process"]["args"] = ["/bin/sh", "-c", "umask"]
    write_spec(bundle, spec)
    root = tmp_path / "state"
    with open(tmp_path / "out", "w") as out:
        made = subprocess.run(
            [sys.executable, "-c", UMASK_ENGINE, RUNTIME, "--root", str(root), "create", "--bundle", str(bundle), "m"],
            stdout=out,
            stderr=out,
            timeout=60,
        )
    assert made.returncode == 0, (tmp_path / "out").read_text()
    assert ("enclave_pid" in _record(root, "m")) == resident
    assert runtime(root, "start", "m").returncode == 0
    for _ in range(400):
        if state(root, "m")["status"] == "stopped":
            break
        time.sleep(0.05)
    assert (tmp_path / "out").read_text().split() == ["0002"]
    assert runtime(root, "delete", "m").returncode == 0


@pytest.mark.parametrize(
    "argv, env, word",
    [
        (["--socket", "relative/sock"], {}, "absolute"),
        ([], {"COVE_RUNTIME_RESIDENT": "0"}, "switches the resident create off"),
    ],
    ids=["relative", "switched-off"],
)
def test_resident_command_refusals_are_one_line(tmp_path, argv, env, word):
    done = subprocess.run(
        [RUNTIME, "resident", *argv], capture_output=True, text=True, timeout=60, env=dict(os.environ, **env)
    )
    assert done.returncode == 2 and word in one_line(done)


ADOPTER = """
import ctypes, json, os, signal, socket, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: this probe adopts the helper's orphans
got = []
for number in (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP):
    signal.signal(number, lambda n, _f: got.append(n))
path, module, request = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
helper = subprocess.Popen([sys.executable, "-I", "-m", "cove.oci.resident", "serve", path])
children = f"/proc/{helper.pid}/task/{helper.pid}/children"
for _ in range(600):
    try:
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(path)
        break
    except OSError:
        time.sleep(0.05)
while open(children).read().split():  # the worker of that probe, told nothing, leaves
    time.sleep(0.01)
conn = socket.socket(socket.AF_UNIX)
conn.connect(path)  # the helper forks a worker for it; nothing is sent yet
for _ in range(600):
    worker = open(children).read().split()
    if worker:
        break
    time.sleep(0.01)
os.kill(helper.pid, signal.SIGKILL)
helper.wait()
worker = int(worker[0])
for _ in range(600):  # the worker is this probe's now, as it would be init's or a supervisor's
    if open(f"/proc/{worker}/stat").read().rsplit(")", 1)[1].split()[1] == str(os.getpid()):
        break
    time.sleep(0.01)
os.utime(module)  # the code changes on disk while the worker holds the request
conn.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(12))])
conn.settimeout(30)
answer = conn.recv(4096).decode()
time.sleep(0.5)
print(json.dumps({"answer": answer, "signals": got}))
"""


ORPHAN = """
import ctypes, json, os, signal, socket, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: this probe adopts the orphan
got = []
for number in (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP):
    signal.signal(number, lambda n, _f: got.append(n))
from cove.oci import resident
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
me = os.getpid()
if os.fork() == 0:  # the helper, which forks a worker and dies at once
    if os.fork() == 0:  # the worker, told the helper's code is stale, once this probe has adopted it
        ours.close()
        while os.getppid() != me:
            pass
        os._exit(resident.work(theirs, True))
    os._exit(0)
theirs.close()
ours.sendmsg([bytes.fromhex(sys.argv[1])], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(12))])
ours.settimeout(30)
answer = ours.recv(4096).decode()
for _ in range(2):
    os.wait()
print(json.dumps({"answer": answer, "signals": got}))
"""


def test_a_worker_whose_helper_died_never_signals_its_new_parent(bundle, tmp_path):
    """A worker adopted by a subreaper (init, systemd, a supervisor) never signals it, whatever the request:
    the stale-code check is the helper's own, before it forks; a worker signals nobody."""
    from cove.oci import create, resident

    folder = tempfile.mkdtemp(prefix="cove-res-")
    path = os.path.join(folder, "sock")
    request = resident.encode_request(_fields(tmp_path, python="/elsewhere/python"), [])
    try:
        done = subprocess.run(
            [sys.executable, "-c", ADOPTER, path, create.__file__, request.hex()],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        subprocess.run(["rm", "-rf", folder])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"answer": "retry other\n", "signals": []}
    # a worker told its helper's code is stale only declines (it was a SIGUSR1 to os.getppid(): the adopter)
    done = subprocess.run(
        [sys.executable, "-c", ORPHAN, resident.encode_request(_fields(tmp_path), []).hex()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"answer": "retry stale\n", "signals": []}


def test_two_restarts_close_together_leave_a_serving_helper(helper, tmp_path):
    """USR1 (a restart) while the re-executed image still loads is ignored, not deadly (SIG_IGN survives exec)."""
    from cove.oci import resident

    path, pid = helper
    os.kill(pid, signal.SIGUSR1)
    time.sleep(0.05)
    os.kill(pid, signal.SIGUSR1)
    newer = b"COVE-OCI-RESIDENT/9\0" + resident.encode_request(_fields(tmp_path), [])[4:].partition(b"\0")[2]
    for _ in range(600):
        assert not _gone(pid), "the helper died of the second restart"
        if _peer_pid(path) == pid:
            try:
                if _request(path, newer) == b"retry version\n":
                    break
            except OSError:
                pass
        time.sleep(0.05)
    else:
        raise AssertionError("the helper did not serve again")
    assert not _gone(pid)


def _link_lock(folder: str, tmp_path: Path) -> None:
    os.symlink(tmp_path / "target", os.path.join(folder, "sock.lock"))


def _link_folder(folder: str, tmp_path: Path) -> str:
    os.symlink(folder, tmp_path / "link")
    return str(tmp_path / "link")


@pytest.mark.parametrize(
    "make, word, flags",
    [
        (lambda folder, _tmp: os.chmod(folder, 0o770), "mode 0700", ["--foreground"]),  # the group could swap it
        (lambda folder, _tmp: os.chmod(folder, 0o770), "mode 0700", []),  # the same, started to run on
        (lambda folder, _tmp: os.chown(folder, 65534, 65534), "mode 0700", ["--foreground"]),  # another uid's
        (_link_folder, "not a folder", ["--foreground"]),
        (_link_lock, "sock.lock", ["--foreground"]),  # O_NOFOLLOW: never a lock (or a file made) through a link
    ],
    ids=["group-writable", "group-writable-started", "another-uid", "linked-folder", "linked-lock"],
)
def test_a_resident_helper_refuses_an_unsafe_folder_in_one_line(tmp_path, make, word, flags):
    folder = tempfile.mkdtemp(prefix="cove-res-")
    try:
        folder = make(folder, tmp_path) or folder
        done = subprocess.run(
            [RUNTIME, "resident", *flags, "--socket", os.path.join(folder, "sock")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and word in one_line(done), done.stderr
        assert not (tmp_path / "target").exists()
        assert not os.path.exists(os.path.join(folder, "sock"))
    finally:
        subprocess.run(["rm", "-rf", os.path.realpath(folder), str(tmp_path / "link")])
