"""`cove run` through the daemon without click or the runtime (cove.cli.attached), and when it steps aside."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cove.cli.attached import folder_runs_on_node, parse_run_argv
from tests.conftest import error_line

HEAVY = ("click", "cove.runtime", "cove.image", "cove.config", "cryptography", "pyfuse3", "tomllib")
# and modules of the standard library that cost a start milliseconds of CPU the fast paths do without
SLOW_STDLIB = ("pathlib", "typing", "urllib", "importlib", "fnmatch", "ipaddress", "warnings", "threading")
HEAVY += SLOW_STDLIB
# and what `cove run` through the daemon does without: json, socket and signal (all three import enum, json
# also re), cove.errors (re, enum) and cove.trace (contextlib, collections, functools), each imported only
# when the run needs it (a failure, COVE_TRACE_START, direct mode)
RUN_AVOIDS = ("re", "enum", "json", "socket", "signal", "selectors", "contextlib", "collections", "functools")
RUN_AVOIDS += ("cove.errors", "cove.trace")
WATCHED = HEAVY + RUN_AVOIDS


def watched(imported: list[str], names: tuple[str, ...]) -> list[str]:
    return [m for m in imported if any(m == name or m.startswith(name + ".") for name in names)]


# cove's own entry point, reporting at exit which watched modules the process imported (a name, or a
# module under it)
ENTRY = (
    "import atexit, sys\n"
    "def report():\n"
    f"    heavy = sorted(m for m in sys.modules if any(m == w or m.startswith(w + '.') for w in {WATCHED!r}))\n"
    "    sys.stderr.write('imported: ' + ' '.join(heavy) + '\\n')\n"
    "atexit.register(report)\n"
    "from cove.cli import run_main\n"
    "sys.argv = ['cove', *sys.argv[1:]]\n"
    "run_main()\n"
)


def cove_reporting(c, *args: str, cwd: Path, env: dict | None = None) -> tuple[int, str, str, list[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", ENTRY, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=dict(c.env, **(env or {})),
        timeout=120,
    )
    lines = proc.stderr.splitlines()
    imported = [ln for ln in lines if ln.startswith("imported:")][-1].split()[1:]
    rest = "\n".join(ln for ln in lines if not ln.startswith("imported:"))
    return proc.returncode, proc.stdout, rest, imported


def test_run_through_the_daemon_imports_nothing_heavy(node, app):
    code, out, err, imported = cove_reporting(node.cove, "run", "/bin/hello", "0", "4", cwd=app)
    assert (code, out) == (4, "hello 3\nto stderr\n"), err
    assert imported == []
    code, out, err, _ = cove_reporting(node.cove, "-C", str(app), "run", "/bin/missing", cwd=app.parent)
    assert code == 127 and "/bin/missing is not in the image" in err and "Traceback" not in err
    # directly: the runtime, still no click; with an option: the full CLI (so the checks above can fail)
    direct = {"COVE_NO_DAEMON": "1"}
    code, out, _, imported = cove_reporting(node.cove, "run", "/bin/hello", "0", "4", cwd=app, env=direct)
    assert (code, out) == (4, "hello 3\n") and "click" not in imported and "cove.runtime" in imported
    assert {"pathlib", "typing"} <= set(imported)  # what the runtime needs, seen by the same check
    code, out, _, imported = cove_reporting(
        node.cove, "run", "--backend", "sim", "/bin/hello", "0", "4", cwd=app, env=direct
    )
    assert (code, out) == (4, "hello 3\n") and "click" in imported and "cove.runtime" in imported


SIGNER = "ab" * 32  # an option that sends the same run through the full CLI


@pytest.mark.parametrize("case", ["not an instance", "missing program", "not an entry point", "tampered"])
def test_direct_without_click_fails_as_the_full_cli(cove, app, tmp_path, case):
    """The early direct path's errors: the same line and exit code as the full CLI's."""
    root, program = app, "/bin/hello"
    if case == "not an instance":
        root = tmp_path / "empty"
        root.mkdir()
    elif case == "missing program":
        program = "/bin/missing"
    elif case == "not an entry point":
        program = "/etc/passwd"
    else:
        root = tmp_path / "tampered"
        shutil.copytree(app, root, symlinks=True)
        with open(root / "image" / "bin" / "hello", "ab") as handle:
            handle.write(b"\0")
    env = {"COVE_NO_DAEMON": "1"}
    plain = cove("-C", str(root), "run", program, cwd=tmp_path, env=env)
    full = cove("-C", str(root), "run", "--backend", "auto", program, cwd=tmp_path, env=env)
    assert plain.returncode == full.returncode != 0
    assert error_line(plain) == error_line(full) and "Traceback" not in plain.stderr


@pytest.mark.parametrize(
    "argv, parsed",
    [
        (["run", "/bin/hello"], (".", "/bin/hello", ())),
        (["-C", "app", "run", "/bin/hello", "-x", "--y", "run"], ("app", "/bin/hello", ("-x", "--y", "run"))),
        (["-C", "run", "run", "/bin/hello"], ("run", "/bin/hello", ())),
        (["run"], None),
        (["run", "-d", "/bin/hello"], None),
        (["run", "--signer", "00", "/bin/hello"], None),
        (["run", "--", "/bin/hello"], None),
        (["--debug", "run", "/bin/hello"], None),
        (["-Capp", "run", "/bin/hello"], None),
        (["-C", "", "run", "/bin/hello"], None),
        (["-C"], None),
        (["ps"], None),
        ([], None),
    ],
)
def test_only_the_plain_form_is_taken(argv, parsed):
    """Any option goes to the full CLI, which parses and checks it as before."""
    assert parse_run_argv(argv) == parsed


BROKEN_TOMLS = [
    '[enclave]\nname = "a"\nbackend = "sgx"\n',
    '[enclave]\nbackend = ["sim"]\n',
    'enclave = "sim"\n',
    "[enclave\nname = ",
    "\udcff not utf-8",
    "a = " + "[" * 3000 + "]" * 3000 + "\n",  # deep enough that tomllib recurses out
]


@pytest.mark.parametrize(
    "toml, encrypted, runs",
    [
        ('[enclave]\nname = "a"\n', False, True),
        ('[enclave]\nname = "a"\nbackend = "sim"\n', False, True),
        ('[enclave]\nname = "a"\nbackend = "vm"\n', False, True),  # the node runs vm builds too
        ('[enclave]\nname = "a"\nbackend = "vm"\n', True, False),
        ('[enclave]\nname = "a"\n', True, False),
        (None, False, False),
        *((toml, False, True) for toml in BROKEN_TOMLS),  # the daemon reports them, as for the full CLI
    ],
)
def test_the_plain_form_sends_the_daemon_what_the_full_cli_sends(tmp_path, toml, encrypted, runs):
    """Every instance with a cove.toml whose build is not encrypted, without parsing cove.toml: as
    cove.cli.run.runs_on_node decides with no --backend (a cove.toml that does not parse included)."""
    if toml is not None:
        (tmp_path / "cove.toml").write_bytes(toml.encode("utf-8", "surrogateescape"))
    if encrypted:
        (tmp_path / "build" / "image.enc").mkdir(parents=True)
    assert folder_runs_on_node(tmp_path) is runs


@pytest.mark.parametrize("toml", BROKEN_TOMLS)
def test_a_broken_cove_toml_fails_alike_both_ways(node, app, tmp_path, toml):
    """Sent to the daemon by the plain form and by the full CLI: the same line, the same exit code."""
    root = tmp_path / "broken"
    shutil.copytree(app, root, symlinks=True)
    (root / "cove.toml").write_bytes(toml.encode("utf-8", "surrogateescape"))
    plain = node.cove("-C", str(root), "run", "/bin/hello", cwd=tmp_path)
    full = node.cove("-C", str(root), "run", "--backend", "auto", "/bin/hello", cwd=tmp_path)
    assert plain.returncode == full.returncode != 0
    # the store's import folder in the line is a new one at each import
    same = [re.sub(r"import-[0-9]+-[0-9a-f]+", "import-N", error_line(r)) for r in (plain, full)]
    assert same[0] == same[1]


@pytest.fixture
def fake_daemon(tmp_path) -> Iterator[tuple[str, list[bytes]]]:
    """A unix socket that answers each request with the next scripted reply (then closes)."""
    path = str(tmp_path / "fake.sock")
    replies: list[bytes] = []
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(5)
                try:
                    connection.recv(1 << 20)
                    connection.sendall(replies.pop(0) if replies else b"")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, replies
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()


def http(status: str, body: bytes) -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


VERSION_OK = http("200 OK", b'{"api": "v1"}')


@pytest.mark.parametrize(
    "replies, code, line",
    [
        # a socket that does not speak HTTP is no daemon: direct mode, as before
        ([b"SSH-2.0-OpenSSH\r\n"], 0, None),
        ([b""], 0, None),
        # the daemon refuses this user: direct mode
        ([http("403 Forbidden", b'{"detail": "no", "exit_code": 6}')], 0, None),
        # a daemon that answers, then fails: one line, its exit code, no direct run behind its back
        ([VERSION_OK, b"garbage\r\n\r\n"], 7, "not answering"),
        ([VERSION_OK, http("500 Oops", b'{"detail": "boom", "exit_code": 9, "x": [1, 2]}')], 9, "boom"),
        ([VERSION_OK, http("201 Created", b"not json!")], 7, "not an enclave"),
        ([VERSION_OK, http("201 Created", b'{"id": ["a"]}')], 7, "not an enclave"),
        ([VERSION_OK, http("200 OK", b"[" * 100000)], 7, "not an enclave"),
        ([VERSION_OK, b"HTTP/1.1 201 Created\r\nContent-Length: 1e9\r\n\r\n"], 7, "not answering"),
        ([VERSION_OK, b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"], 7, "broke off"),
        (
            [VERSION_OK, http("409 Conflict", b'{"detail": "two\\nlines", "exit_code": 99999, "kind": 5}')],
            2,
            "two lines",
        ),
    ],
)
def test_hostile_or_broken_daemon(cove, app, fake_daemon, replies, code, line):
    path, script = fake_daemon
    script.extend(replies)
    result = cove("run", "/bin/hello", cwd=app, env={"COVE_DAEMON_SOCKET": path})
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    if code == 0:
        assert result.stdout.startswith("hello 1")  # it ran directly
    else:
        assert result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1
        if line:
            assert line in error_line(result)


def test_no_daemon_socket_runs_directly(cove, app, tmp_path):
    result = cove("run", "/bin/hello", cwd=app, env={"COVE_DAEMON_SOCKET": str(tmp_path / "none.sock")})
    assert result.returncode == 0 and result.stdout.startswith("hello 1")
    assert not os.path.exists(tmp_path / "none.sock")


STATUS = re.compile(r"(Up \w+|Exited \(\d+\)( \w+ ago)?|Starting|Restarting)")


def test_ps_without_click_prints_as_the_full_cli(node, app):
    c = node.cove
    ident = c.ok("run", "-d", "/bin/hello", "30", cwd=app).stdout.strip()
    assert c("run", "/bin/hello", "0", "3", cwd=app).returncode == 3  # ended and removed: not listed
    try:
        for flags in ([], ["-a"], ["-q"], ["-a", "-q"], ["--all", "--quiet"]):
            plain, full = c("ps", *flags), c("-C", ".", "ps", *flags)  # -C first: the full CLI
            assert plain.returncode == full.returncode == 0
            assert STATUS.sub("S", plain.stdout) == STATUS.sub("S", full.stdout), flags
            assert ident[:12] in plain.stdout
        plain = json.loads(c.ok("ps", "--json").stdout)
        assert [v["id"] for v in plain] == [v["id"] for v in json.loads(c.ok("-C", ".", "ps", "--json").stdout)]
        code, out, err, imported = cove_reporting(c, "ps", cwd=app)
        assert code == 0 and ident[:12] in out and watched(imported, HEAVY) == [], err
    finally:
        c.ok("rm", "-f", ident)


@pytest.mark.parametrize(
    "reply, line",
    [
        (http("200 OK", b'{"not": "a list"}'), "not a list of enclaves"),
        (http("200 OK", b'[{"id": 5}]'), "not a list of enclaves"),
        (
            http(
                "200 OK", b'[{"id": "a", "name": "b", "measurement": "c", "backend": "d", "state": "e", "uptime": "x"}]'
            ),
            "not a list of enclaves",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n[1,2]\r\nQQ\r\n", "broke off"),
    ],
)
def test_ps_of_a_hostile_daemon_is_one_line(cove, fake_daemon, tmp_path, reply, line):
    path, script = fake_daemon
    for form in (["ps"], ["-C", str(tmp_path), "ps"]):  # without click, and the full CLI
        script.append(reply)
        result = cove(*form, env={"COVE_DAEMON_SOCKET": path})
        assert result.returncode == 7 and line in error_line(result), (form, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_ps_without_a_daemon(cove, tmp_path):
    env = {"COVE_DAEMON_SOCKET": str(tmp_path / "none.sock")}
    plain, full = cove("ps", env=env), cove("-C", str(tmp_path), "ps", env=env)
    assert plain.returncode == full.returncode == 7
    assert error_line(plain) == error_line(full) and "the Cove daemon is not running" in error_line(plain)
