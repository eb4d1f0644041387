"""`cove exec -i/-t` into a vm enclave, and an attached `cove run` of a vm instance through the daemon.

Three boots in all (each costs seconds of TCG): one running enclave that
every exec test shares, and one `cove run` through the daemon and one
directly, compared.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from cove.image import vmimage
from cove.runtime import vm
from tests.conftest import COVE, require
from tests.daemon.conftest import node, test_group  # noqa: F401
from tests.daemon.test_exec import TOOLS, _read_until, _set_size
from tests.e2e.helpers import make_instance


@pytest.fixture(scope="module")
def vm_app(node, tmp_path_factory) -> Path:  # noqa: F811
    require("qemu-system-x86_64")
    root = make_instance(
        node.cove, tmp_path_factory.mktemp("vmexec"), options={("enclave", "backend"): '"vm"'}, build=False
    )
    node.cove.ok("add", *TOOLS, cwd=root)
    node.cove.ok("build", cwd=root)
    return root


@pytest.fixture(scope="module")
def running(node, vm_app):  # noqa: F811
    """One running vm enclave (a long sleep) for every exec test here; removed afterwards."""
    ident = node.cove.ok("run", "-d", "/bin/sleep", "600", cwd=vm_app).stdout.strip()
    node.until(ident, "running", timeout=120)
    deadline = time.monotonic() + 120
    while (probe := node.cove("exec", ident, "/bin/echo")).returncode != 0:  # the guest takes requests
        assert time.monotonic() < deadline, probe
        time.sleep(0.2)
    yield ident
    node.cove("rm", "-f", ident)


def _guest_running(node, ident: str, marker: str) -> bool:
    seen = node.cove.ok("exec", ident, "/bin/sh", "-c", "cat /proc/[0-9]*/cmdline 2>/dev/null; exit 0").stdout
    return marker in seen.replace("\0", " ")


def _wait_for(check, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_exec_it_gives_a_terminal_of_the_guest(node, running):  # noqa: F811
    """A terminal of the guest's own devpts, sized at the start and at every resize; a client that
    leaves takes the terminal's whole session with it."""
    pid, master = pty.fork()
    if pid == 0:  # the child: `cove exec -it` at a terminal of 33 x 101
        try:
            _set_size(0, 33, 101)
            os.execve(COVE, [COVE, "exec", "-it", running, "/bin/sh"], node.cove.env)
        finally:
            os._exit(120)
    try:
        os.write(master, b"echo mark-$((6 * 7))\n")
        _read_until(master, b"mark-42", timeout=60)
        os.write(master, b"stty size; tty; echo done-$((0 + 1))\n")
        out = _read_until(master, b"done-1\r\n", timeout=60)
        assert b"33 101\r\n" in out and b"/dev/pts/0\r\n" in out  # the guest's devpts, a new instance
        _set_size(master, 40, 120)  # SIGWINCH to `cove exec`, then to the helper, then to the guest
        deadline = time.monotonic() + 60
        while True:
            os.write(master, b"stty size; echo done-$((0 + 2))\n")
            if b"40 120" in _read_until(master, b"done-2\r\n", timeout=60):
                break
            assert time.monotonic() < deadline, "the new window size never reached the guest"
            time.sleep(0.2)
        # Ctrl-C is the guest terminal's: it interrupts the foreground job, the shell goes on
        os.write(master, b"sleep 607\n")
        _wait_for(lambda: _guest_running(node, running, "sleep 607"), what="the sleep never started")
        os.write(master, b"\x03")
        _wait_for(lambda: not _guest_running(node, running, "sleep 607"), what="Ctrl-C did not reach the sleep")
        os.write(master, b"echo after-$((1 + 2))\n")
        _read_until(master, b"after-3", timeout=60)
        os.write(master, b"exit 3\n")
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(master)
    # a client that leaves: its terminal's session goes, a job in a process group of its own too
    pid, master = pty.fork()
    if pid == 0:
        os.execve(COVE, [COVE, "exec", "-t", running, "/bin/sh", "-c", "sleep 608 & exec sleep 609"], node.cove.env)
    try:
        _wait_for(lambda: _guest_running(node, running, "sleep 609"), what="the program never started")
        assert _guest_running(node, running, "sleep 608")
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for marker in ("sleep 608", "sleep 609"):
            _wait_for(lambda m=marker: not _guest_running(node, running, m), what=f"{marker} outlived the client")
    finally:
        os.close(master)


def _exec_bytes(node, *args: str, data: bytes) -> subprocess.CompletedProcess:  # noqa: F811
    return subprocess.run([COVE, "exec", *args], input=data, capture_output=True, env=node.cove.env, timeout=600)


def test_stdin_streams_and_ends(node, running):  # noqa: F811
    size = 1 << 20
    data = bytes(range(256)) * (size // 256)
    done = _exec_bytes(node, "-i", running, "/bin/sh", "-c", "cat; echo end >&2", data=data)
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout == data and done.stderr == b"end\n"
    # a program that stops reading early: the rest of the input is dropped, the exit code still comes
    early = _exec_bytes(node, "-i", running, "/usr/bin/head", "-c", "5", data=b"y" * size)
    assert (early.returncode, early.stdout) == (0, b"yyyyy")
    # without -i the program's stdin is empty
    assert _exec_bytes(node, running, "/usr/bin/wc", "-c", data=b"ignored").stdout.strip() == b"0"
    # the end of one session's input reaches its program while another session runs (the other's
    # helper in the guest holds no descriptor of this one)
    first = subprocess.Popen(
        [COVE, "exec", "-i", running, "/bin/cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=node.cove.env
    )
    second = subprocess.Popen([COVE, "exec", running, "/bin/sleep", "611"], env=node.cove.env)
    try:
        assert first.stdin is not None and first.stdout is not None
        first.stdin.write(b"abc")
        first.stdin.flush()
        assert first.stdout.read(3) == b"abc"  # cat runs (and so its session's pipes exist)
        _wait_for(lambda: _guest_running(node, running, "sleep 611"), what="the second session never started")
        first.stdin.close()
        assert first.wait(timeout=60) == 0 and second.poll() is None
    finally:
        for client in (first, second):
            client.kill()
            client.wait()


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:")) << 10


def test_a_client_that_stops_reading_holds_the_program_not_memory(node, running):  # noqa: F811
    """Output waits for a client that does not read (the guest's window), then all of it arrives."""
    launcher = node.state(running)["supervisor_pid"]
    size = 8 << 20
    client = subprocess.Popen(
        [COVE, "exec", running, "/bin/sh", "-c", f"head -c {size} /dev/zero; echo written >&2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=node.cove.env,
    )
    assert client.stdout is not None and client.stderr is not None
    try:
        first = client.stdout.read(1)  # the output flows; from here nobody reads for a while
        before = _rss(launcher)
        time.sleep(4)  # the guest writes MiBs a second: the old launcher dropped the client by then
        assert client.poll() is None
        assert _rss(launcher) - before < 4 << 20  # the old launcher queued 512 lines (4 MiB) and then dropped it
        rest = client.stdout.read()
        assert client.wait(timeout=300) == 0
        assert len(first + rest) == size and set(rest) == {0}
        assert client.stderr.read() == b"written\n"
    finally:
        client.kill()
        client.wait()


def test_hostile_requests_and_input_lines_at_the_launcher(node, running):  # noqa: F811
    """Straight at the launcher's socket: malformed requests and input end nothing but their own session,
    and a program name cannot forge a control line."""
    path = vm.exec_socket(node.state(running)["supervisor_pid"])
    assert path is not None

    def ask(request: bytes, then: bytes = b"") -> list[bytes]:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(60)
            conn.connect(str(path))
            conn.sendall(request + then)
            return conn.makefile("rb").read().splitlines()

    base = {"argv": ["/bin/cat"], "stdin": True}
    for bad in ({**base, "tty": "yes"}, {**base, "rows": 70000}, {**base, "cols": -1}, {**base, "more": 1}):
        assert ask(json.dumps(bad).encode() + b"\n") == [b"r0:malformed exec request"], bad
    refused = ask(json.dumps({"argv": ["/who\nx9.t.1.1:2f\no9:41"], "tty": True}).encode() + b"\n")
    assert len(refused) == 1 and b"is not an entry point" in refused[0], refused
    # input in lines: echoed, then the end of it ends cat
    request = json.dumps(base).encode() + b"\n"
    answer = ask(request, b"i" + b"hello".hex().encode() + b"\ni\n")
    assert answer[-1].endswith(b":0") and b"".join(bytes.fromhex(a.split(b":")[1].decode()) for a in answer[:-1]) == (
        b"hello"
    )
    # a malformed input line (odd hex, not hex, too long, an unknown kind, a window of 70000 rows) is
    # the client leaving: its program is killed, the enclave goes on
    for line in (b"i123\n", b"ixyz0\n", b"i" + b"00" * 4097 + b"\n", b"q\n", b"w70000:1\n"):
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(60)
            conn.connect(str(path))
            conn.sendall(json.dumps({"argv": ["/bin/sh", "-c", "echo up; exec sleep 610"], "stdin": True}).encode())
            conn.sendall(b"\n")
            assert conn.recv(100).startswith(b"o")
            conn.sendall(line)
            rest = conn.makefile("rb").read()
            assert not rest.startswith(b"x"), (line, rest)
        _wait_for(lambda: not _guest_running(node, running, "sleep 610"), what=f"{line[:10]!r} left the program")
    assert node.cove.ok("exec", running, "/bin/echo", "still").stdout == "still\n"


def test_guest_exec_modes_are_parsed_strictly(tmp_path):
    """The guest init's reading of an exec request's mode: only ".i|t.<rows>.<cols>" after the id."""
    require("gcc")
    (tmp_path / "t.c").write_text(f'''#define main cove_init_main
#include "{vmimage.INIT_SOURCE}"
#undef main
static int parses(const char *line) {{
    struct exec_mode mode;
    const char *colon = strchr(line, ':');
    return exec_parse_mode(line, colon, &mode) ? mode.kind ? mode.kind : '-' : 0;
}}
int main(void) {{
    const char *bad[] = {{"1.x.1.1:", "1.i.1:", "1.t.70000.1:", "1.i.1.1.:", "1i:", "1.i.1.1x:", "1..1.1:", "1.:"}};
    for (unsigned i = 0; i < sizeof bad / sizeof *bad; i++) if (parses(bad[i])) return 1 + (int)i;
    if (parses("12:") != '-' || parses("12.i.0.0:") != 'i' || parses("3.t.65535.80:") != 't') return 20;
    return 0;
}}
''')
    subprocess.run(["gcc", "-O2", "-o", str(tmp_path / "t"), str(tmp_path / "t.c")], check=True)
    assert subprocess.run([str(tmp_path / "t")]).returncode == 0


@pytest.mark.parametrize(
    "line",
    [b"i\n", b"i00ff\n", b"w24:80\n", b"i" + b"ab" * 4096 + b"\n"],
)
def test_client_lines_the_launcher_takes(line):
    assert vm.exec_client_input(line) is not None


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"i0",
        b"i0\n",
        b"ig0\n",
        b"i 0\n",
        b"w24\n",
        b"w:1\n",
        b"w1:70000\n",
        b"w-1:2\n",
        b"x\n",
        b"i" + b"ab" * 4097,
    ],
)
def test_client_lines_the_launcher_refuses(line):
    assert vm.exec_client_input(line) is None


def test_attached_run_through_the_daemon_as_directly(node, vm_app):  # noqa: F811
    """`cove run` of a vm instance goes through the daemon (one boot) with the output, exit code and
    signal forwarding of direct mode (another boot), and removes its enclave."""
    script = "trap 'echo got TERM; exit 40' TERM; echo started; echo err >&2; while :; do sleep 1; done"
    results = []
    for extra in ({}, {"COVE_NO_DAEMON": "1"}):
        events = node.api("GET", "/v1/events?follow=0")[1].count(b'"create"')
        proc = subprocess.Popen(
            node.cove.popen_args("run", "/bin/sh", "-c", script),
            cwd=vm_app,
            env=dict(node.cove.env, **extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()  # the program runs
        proc.send_signal(signal.SIGTERM)
        out = proc.stdout.read()
        proc.wait(timeout=120)
        err = proc.stderr.read()
        # through the daemon stderr joins stdout in the log, from another port: in either order; the
        # shell may also say that its sleep was "Terminated"
        lines = [x for x in (line + out).splitlines() if x not in ("err", "Terminated")]
        results.append((proc.returncode, lines))
        created = node.api("GET", "/v1/events?follow=0")[1].count(b'"create"') - events
        assert created == (0 if extra else 1), (extra, err)
        assert "err" in (err if extra else line + out).splitlines()  # directly, stderr stays on stderr
    assert results[0] == results[1] == (40, ["started", "got TERM"]), results
    assert not [v for v in node.api("GET", "/v1/enclaves?all=1")[1] if v["args"] == ["-c", script]]


def test_a_tampered_vm_build_is_refused_the_same_through_the_daemon(node, vm_app, tmp_path):  # noqa: F811
    """A changed kernel or image file of a build the store has not seen: the same line and exit code
    through the daemon as directly, and no boot either way."""
    import shutil

    from tests.conftest import error_line

    c = node.cove
    copy = tmp_path / "tampered"
    shutil.copytree(vm_app, copy, symlinks=True)
    (copy / "image" / "new.txt").write_text("a new build: a measurement the store has not seen\n")
    c.ok("build", cwd=copy)
    # the kernel first: the store checks a vm build's launch files at import, so a tampered kernel is
    # never stored under the signed build's id (where the image case after it would meet it)
    for target, offset, line in (
        (copy / "build" / "vm" / "vmlinuz", 4113, "kernel"),
        (copy / "image" / "bin" / "echo", 100, "image changed"),
    ):
        original = target.read_bytes()
        data = bytearray(original)
        data[offset] ^= 1
        target.write_bytes(bytes(data))
        via, alone = c("run", "/bin/echo", cwd=copy), c("run", "/bin/echo", cwd=copy, env={"COVE_NO_DAEMON": "1"})
        assert via.returncode == alone.returncode == 3 and via.stdout == alone.stdout == "", (via, alone)
        assert error_line(via) == error_line(alone) and line in error_line(via), (via.stderr, alone.stderr)
        target.write_bytes(original)
    assert not any(e["instance"] == str(copy) for e in node.api("GET", "/v1/enclaves?all=1")[1])


@pytest.mark.parametrize(
    "backend, option, through_the_node",
    [("vm", None, True), ("vm", "vm", False), ("vm", "sim", False), ("sim", None, True), ("sim", "sim", True)],
)
def test_which_runs_the_full_cli_sends_to_the_node(tmp_path, backend, option, through_the_node):
    """A vm instance goes through the daemon as its cove.toml says; any --backend runs it directly
    (the daemon takes no backend but sim's)."""
    from cove.cli.run import runs_on_node
    from cove.image import instance as instance_mod

    (tmp_path / "cove.toml").write_text(f'[enclave]\nname = "a"\nbackend = "{backend}"\n')
    assert runs_on_node(instance_mod.open_instance(tmp_path), option) is through_the_node
