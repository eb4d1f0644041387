"""Exit codes, signals, stdin and stdout pass through the enclave boundary."""

from __future__ import annotations

import signal
import subprocess

import pytest

from tests.e2e.helpers import make_instance


@pytest.fixture(scope="module")
def app(cove, probe, tmp_path_factory):
    return make_instance(cove, tmp_path_factory.mktemp("proc"), probe)


@pytest.mark.parametrize("code", [0, 1, 7, 255])
def test_exit_codes_propagate(cove, app, code):
    assert cove("run", "/bin/probe", "exit", str(code), cwd=app).returncode == code


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT])
def test_death_by_signal_is_128_plus_n(cove, app, signum):
    assert cove("run", "/bin/probe", "kill", str(int(signum)), cwd=app).returncode == 128 + signum


def test_stdin_and_stdout_pass_through(cove, app):
    result = cove("run", "/bin/probe", "echo", cwd=app, input="through the boundary")
    assert result.stdout == "through the boundary"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_are_forwarded_to_the_program(cove, app, signum):
    proc = cove.popen("run", "/bin/probe", "trap", cwd=app, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert f"got signal {int(signum)}" in out
    assert proc.returncode == 40 + signum


def test_sigterm_kills_a_program_without_a_handler(cove, app):
    proc = cove.popen("run", "/bin/probe", "wait", cwd=app, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
