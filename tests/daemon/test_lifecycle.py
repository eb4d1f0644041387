"""`cove daemon` and the lifecycle commands, with real supervisors, bubblewrap and /dev/attestation."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import time

from tests.conftest import error_line


def test_run_detached_ps_logs_wait_rm(node, app):
    c = node.cove
    ident = c.ok("run", "-d", "--name", "basic", "/bin/hello", "1", "5", cwd=app).stdout.strip()
    assert len(ident) == 64
    listed = c.ok("ps").stdout
    assert ident[:12] in listed and "basic" in listed and "running" in listed
    view = node.state("basic")
    assert view["measurement"] == c.ok("inspect", "--json", cwd=app).stdout.split('"measurement": "')[1][:64]
    assert c.ok("wait", "basic").stdout.strip() == "5"
    assert ident[:12] not in c.ok("ps").stdout
    ended = c.ok("ps", "-a").stdout
    assert "Exited (5)" in ended and "basic" in ended
    assert c.ok("logs", "basic").stdout == "hello 3\nto stderr\n"
    assert c.ok("logs", "--tail", "1", "basic").stdout == "to stderr\n"
    inspected = json.loads(c.ok("inspect", ident[:12]).stdout)
    assert inspected["exit_code"] == 5 and inspected["state"] == "exited"
    c.ok("rm", "basic")
    assert "basic" not in c.ok("ps", "-a").stdout
    assert c("logs", "basic").returncode == 8


def test_same_result_with_and_without_daemon(node, app, tmp_path):
    """Output, exit code and the error line are the same through the daemon and directly."""
    c = node.cove
    direct = dict(COVE_NO_DAEMON="1")
    for args in (("/bin/hello",), ("/bin/hello", "0", "3"), ("/bin/missing",)):
        via, alone = c("run", *args, cwd=app), c("run", *args, cwd=app, env=direct)
        assert (via.returncode, via.stdout.replace("to stderr\n", "")) == (alone.returncode, alone.stdout), args
        if alone.returncode == 127:
            assert error_line(via) == error_line(alone)
    # an image changed after its build and never imported: integrity (3) both ways, the same line
    copy = tmp_path / "tampered"
    shutil.copytree(app, copy, symlinks=True)
    (copy / "image" / "new.txt").write_text("a new build: a measurement the store has not seen\n")
    c.ok("build", cwd=copy)
    with open(copy / "image" / "bin" / "hello", "ab") as handle:
        handle.write(b"\0")
    via, alone = c("run", "/bin/hello", cwd=copy), c("run", "/bin/hello", cwd=copy, env=direct)
    assert via.returncode == alone.returncode == 3
    assert error_line(via) == error_line(alone)
    assert "image changed since the build" in error_line(via)
    assert not any(e["instance"] == str(copy) for e in node.api("GET", "/v1/enclaves?all=1")[1])
    # once imported, edits to image/ no longer reach the node: the verified stored tree runs (docs/node.md)
    imported = tmp_path / "imported"
    shutil.copytree(app, imported, symlinks=True)
    with open(imported / "image" / "bin" / "hello", "ab") as handle:
        handle.write(b"\0")
    assert c("run", "/bin/hello", cwd=imported).stdout.startswith("hello 1")


def test_stop_kill_and_signals(node, app):
    c = node.cove
    c.ok("run", "-d", "--name", "term", "/bin/hello", "t", "100", cwd=app)
    c.ok("run", "-d", "--name", "stubborn", "/bin/hello", "100", cwd=app)
    node.until("term", "running")
    time.sleep(0.3)
    c.ok("stop", "term")
    assert node.state("term")["exit_code"] == 40  # its own SIGTERM handler ran
    assert "got 15" in c.ok("logs", "term").stdout
    c.ok("kill", "-s", "USR1", "stubborn")  # default action of SIGUSR1: the program dies of it
    assert node.until("stubborn", "exited")["exit_code"] == 128 + signal.SIGUSR1
    c.ok("run", "-d", "--name", "killed", "/bin/hello", "100", cwd=app)
    node.until("killed", "running")
    c.ok("kill", "killed")
    assert node.until("killed", "exited")["exit_code"] == 137
    bad = c("kill", "-s", "NOPE", "killed")
    assert bad.returncode == 2 and "unknown signal" in error_line(bad)
    assert c("stop", "nobody").returncode == 8
    c.ok("run", "-d", "--name", "busy", "/bin/hello", "100", cwd=app)
    refused = c("rm", "busy")
    assert refused.returncode == 2 and "stop it first" in error_line(refused)
    c.ok("rm", "-f", "busy", "term", "stubborn", "killed")


def test_restart_policy_and_events(node, app):
    c = node.cove
    since = node.api("GET", "/v1/events?follow=0")[1]
    last = max([json.loads(line)["seq"] for line in since.decode().splitlines() if line.strip()] or [0])
    c.ok("run", "-d", "--name", "flaky", "--restart", "on-failure:2", "/bin/hello", "0", "3", cwd=app)
    view = node.until("flaky", "exited", timeout=60)
    assert view["restarts"] == 2 and view["exit_code"] == 3
    assert c.ok("logs", "flaky").stdout.count("hello 3") == 3
    time.sleep(1)  # the watcher notices exits every 0.5 s
    events = [json.loads(line) for line in c.ok("events", "--since", str(last), "--no-follow").stdout.splitlines()]
    actions = [e["action"] for e in events if e.get("name") == "flaky"]
    assert actions[:2] == ["create", "start"] and "die" in actions
    bad = c("run", "-d", "--restart", "sometimes", "/bin/hello", cwd=app)
    assert bad.returncode == 2 and "--restart" in error_line(bad)
    c.ok("rm", "flaky")


def test_daemon_kill9_loses_no_enclave_and_no_line(node, app):
    c = node.cove
    c.ok("run", "-d", "--name", "survivor", "/bin/hello", "t", "3", "0", cwd=app)
    node.until("survivor", "running")
    node.kill9()
    assert c("ps").returncode == 7  # nothing answers now
    time.sleep(3.5)  # the enclave ends while no daemon runs
    node.start()
    view = node.state("survivor")
    assert view["state"] == "exited" and view["exit_code"] == 0 and view["error"] is None
    assert c.ok("logs", "survivor").stdout == "hello 3\nto stderr\n"
    # and a running one is found and stopped by the new daemon
    c.ok("run", "-d", "--name", "longer", "/bin/hello", "100", cwd=app)
    node.until("longer", "running")
    node.kill9()
    node.start()
    assert node.state("longer")["state"] == "running"
    c.ok("stop", "-t", "1", "longer")
    c.ok("rm", "survivor", "longer")


def test_supervisor_kill9_mid_start(node, app):
    """A supervisor killed while starting: recorded as killed (137), nothing left running, next start fine."""
    c = node.cove
    c.ok("run", "-d", "--name", "cut", "/bin/hello", "100", cwd=app)
    view = node.state("cut")
    os.kill(view["supervisor_pid"], signal.SIGKILL)
    ended = node.until("cut", "exited")
    assert ended["exit_code"] == 137 and "supervisor was killed" in ended["error"]
    time.sleep(0.5)
    leftovers = subprocess.run(["pgrep", "-f", f"cove-enclave-{view['supervisor_pid']}-"], capture_output=True)
    assert leftovers.returncode == 1
    c.ok("rm", "cut")
    c.ok("run", "-d", "--name", "cut", "/bin/hello", cwd=app)
    assert node.until("cut", "exited")["exit_code"] == 0
    c.ok("rm", "cut")


def test_two_clients_same_name(node, app):
    c = node.cove
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: c("run", "-d", "--name", "only", "/bin/hello", "5", cwd=app), range(4)))
    winners = [r for r in results if r.returncode == 0]
    losers = [r for r in results if r.returncode != 0]
    assert len(winners) == 1 and len(losers) == 3
    for loser in losers:
        assert loser.returncode == 2 and "already used" in error_line(loser)
    c.ok("rm", "-f", "only")


def test_not_running_and_direct_mode(cove, app, tmp_path):
    env = {"COVE_DAEMON_SOCKET": str(tmp_path / "none.sock")}
    for args in (("ps",), ("logs", "x"), ("stop", "x"), ("images",)):
        result = cove(*args, env=env)
        assert result.returncode == 7 and "daemon is not running" in error_line(result)
    detached = cove("run", "-d", "/bin/hello", cwd=app, env=env)
    assert detached.returncode == 7
    direct = cove("run", "/bin/hello", cwd=app, env=env)  # runs without it
    assert direct.returncode == 0 and direct.stdout == "hello 1\n"


def test_half_registered_enclave_is_dropped_at_restart(node, app):
    """The daemon killed between writing a record and forking its supervisor: the next daemon drops it."""
    from cove.daemon.registry import Registry

    node.kill9()
    Registry(node.root).create(
        {
            "name": "half",
            "image": "x",
            "measurement": "",
            "signer": "",
            "backend": "sim",
            "program": "/bin/hello",
            "args": [],
            "instance": str(app),
            "restart": "no",
        }
    )
    node.start()
    assert all(v["name"] != "half" for v in node.api("GET", "/v1/enclaves?all=1")[1])
    node.cove.ok("run", "-d", "--name", "half", "/bin/hello", cwd=app)  # and its name is free again
    assert node.until("half", "exited")["exit_code"] == 0
    node.cove.ok("rm", "half")


def test_metrics(node, app):
    import urllib.request

    node.cove.ok("run", "-d", "--name", "measured", "/bin/hello", "30", cwd=app)
    node.until("measured", "running")
    time.sleep(1)
    text = urllib.request.urlopen(f"http://{node.metrics}/metrics", timeout=10).read().decode()
    assert 'cove_enclaves{backend="sim",state="running"}' in text
    assert "cove_enclave_starts_total" in text and "cove_enclave_start_seconds_bucket" in text
    assert 'cove_enclave_memory_bytes{id="' in text and "cove_store_bytes" in text
    assert "cove_attestation_requests" in text
    node.cove.ok("rm", "-f", "measured")


def test_passthrough_environment_both_ways(node, tmp_path):
    """Only [env] passthrough names reach the enclave, and never the supervisor's own environment."""
    from tests.e2e.helpers import set_option

    c = node.cove
    c.ok("new", "envy", cwd=tmp_path)
    root = tmp_path / "envy"
    c.ok("add", "/bin/sh", cwd=root)
    set_option(root / "cove.toml", "env", "passthrough", '["GREETING"]')
    c.ok("build", cwd=root)
    env = {"GREETING": "hi", "LD_PRELOAD": "/nonexistent.so", "OTHER": "x"}
    script = 'echo "$GREETING|$LD_PRELOAD|$OTHER"'
    via = c.ok("run", "/bin/sh", "-c", script, cwd=root, env=env).stdout
    alone = c.ok("run", "/bin/sh", "-c", script, cwd=root, env=dict(env, COVE_NO_DAEMON="1")).stdout
    assert via == alone == "hi||\n"
    ident = c.ok("run", "-d", "/bin/sh", "-c", script, cwd=root, env=env).stdout.strip()
    node.until(ident, "exited")
    record = json.loads((node.root / "enclaves" / ident / "record.json").read_text())
    assert record["env"] == {"GREETING": "hi"}
    c.ok("rm", ident)


def test_signals_to_the_client_reach_the_enclave_both_ways(node, app):
    """SIGTERM to `cove run` is forwarded to the program, through the daemon as directly."""
    results = []
    for extra in ({}, {"COVE_NO_DAEMON": "1"}):
        env = dict(node.cove.env, **extra)
        proc = subprocess.Popen(
            node.cove.popen_args("run", "/bin/hello", "t", "100"),
            cwd=app,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = proc.stdout.readline()  # the program runs
        proc.send_signal(signal.SIGTERM)
        out = proc.stdout.read()  # not communicate(): it would drop what readline() buffered
        proc.wait(timeout=60)
        proc.stderr.close()
        results.append((proc.returncode, line + out))
    assert results[0] == (40, "hello 2\nto stderr\ngot 15\n"), results  # stderr joins stdout in the log
    assert results[1] == (40, "hello 2\ngot 15\n"), results  # stderr stays on stderr
    assert not [
        v
        for v in node.api("GET", "/v1/enclaves?all=1")[1]
        if v["program"] == "/bin/hello" and v["args"] == ["t", "100"]
    ]  # the attached run removed its enclave


def test_what_the_store_does_not_run_runs_directly(node, app, tmp_path):
    """An image built with --encrypt-image, or --backend other than sim: cove run goes direct, same result."""
    c = node.cove
    c.ok("run", "/bin/hello", cwd=app)  # its plain twin (same measurement) is in the store
    copy = tmp_path / "sealed"
    shutil.copytree(app, copy, symlinks=True)
    c.ok("build", "--encrypt-image", "seal:mrsigner", cwd=copy)
    before = len(node.api("GET", "/v1/enclaves?all=1")[1])
    events = node.api("GET", "/v1/events?follow=0")[1].count(b'"create"')
    assert c.ok("run", "/bin/hello", cwd=copy).stdout == "hello 1\n"
    assert node.api("GET", "/v1/events?follow=0")[1].count(b'"create"') == events  # never reached the daemon
    assert len(node.api("GET", "/v1/enclaves?all=1")[1]) == before
    refused = c("run", "-d", "/bin/hello", cwd=copy)
    assert refused.returncode == 2 and "--encrypt-image" in error_line(refused)


def test_client_timeouts(node, app):
    """wait has no timeout (None), the client's default is a clear error, not an OSError."""
    from cove.daemon.client import Client, DaemonError

    ident = node.cove.ok("run", "-d", "/bin/hello", "2", cwd=app).stdout.strip()
    client = Client(node.socket, timeout=0.5)
    try:
        client.call("POST", f"/enclaves/{ident}/wait")
        raise AssertionError("a 2 s wait answered within the 0.5 s default")
    except DaemonError as exc:
        assert exc.exit_code == 7 and "did not answer" in exc.line
    assert client.call("POST", f"/enclaves/{ident}/wait", timeout=None)["exit_code"] == 0
    node.cove.ok("rm", ident)
