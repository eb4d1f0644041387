"""Exit codes, signals, stdin and stdout pass through the enclave boundary."""

from __future__ import annotations

import os
import pty
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cove.runtime.limits import detect_mode
from tests.conftest import error_line
from tests.e2e.helpers import make_instance, set_option


@pytest.fixture(scope="module")
def app(cove, probe, tmp_path_factory):
    return make_instance(cove, tmp_path_factory.mktemp("proc"), probe)


@pytest.mark.parametrize("code", [0, 1, 7, 255])
def test_exit_codes_propagate(cove, app, code):
    assert cove("run", "/bin/probe", "exit", str(code), cwd=app).returncode == code


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT])
def test_death_by_signal_is_128_plus_n(cove, app, signum):
    assert cove("run", "/bin/probe", "kill", str(int(signum)), cwd=app).returncode == 128 + signum


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077], ids=["022", "027", "077"])
def test_the_callers_umask_starts_the_enclave_and_is_the_programs(cove, app, umask):
    """A hardened umask (027, 077) must not shut the enclave's ids out of the sandbox's own folders."""
    result = subprocess.run(
        [*cove.prefix, cove.command, "run", "/bin/probe", "umask"],
        cwd=app,
        env=cove.env,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.umask(umask),
    )
    assert (result.returncode, result.stdout) == (0, f"{umask:03o}\n"), result.stderr


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


@pytest.fixture(scope="module")
def unbuilt(cove, probe, tmp_path_factory):
    """An instance with the probe and shell tools, not built: each case copies it."""
    if not (Path(cove.env["XDG_CONFIG_HOME"]) / "cove" / "signing-key.pem").exists():
        cove.ok("keygen")  # so that a failed build prints nothing but its error
    return make_instance(cove, tmp_path_factory.mktemp("unbuilt"), probe, build=False)


def _break(root, case: str) -> None:
    if case in ("tmp", "dev"):
        (root / "image" / case).mkdir(exist_ok=True)
        (root / "image" / case / "hello").write_text("hidden\n")
    elif case == "mode":
        with open(root / "cove.toml", "a") as handle:
            handle.write('[[mounts]]\ntarget = "/scratch"\ntype = "tmpfs"\noptions = { mode = "999" }\n')
    elif case == "cwd":
        set_option(root / "cove.toml", "process", "cwd", '"/nonexistent"')
    elif case == "memory":
        set_option(root / "cove.toml", "resources", "memory", '"1k"')


@pytest.mark.parametrize(
    "case, message",
    [
        ("tmp", "/tmp/hello in the image is hidden at run time by the tmpfs mount on /tmp"),
        ("dev", "/dev/hello in the image is hidden at run time by the dev mount on /dev"),
        ("mode", "mounts[1].options.mode = '999' is not an octal mode"),
        ("cwd", "process.cwd = '/nonexistent' is not a folder in the image"),
        ("memory", "resources.memory is 1024 bytes, below the minimum of 4M"),
    ],
)
def test_build_refuses_what_would_fail_in_the_sandbox(cove, unbuilt, tmp_path, case, message):
    root = tmp_path / "app"
    shutil.copytree(unbuilt, root, symlinks=True)
    _break(root, case)
    result = cove("build", cwd=root)
    assert result.returncode == 2
    assert message in error_line(result)
    assert not (root / "build" / "manifest.cbor").exists()  # nothing written


def test_out_of_memory_is_named(cove, unbuilt, tmp_path):
    root = tmp_path / "app"
    shutil.copytree(unbuilt, root, symlinks=True)
    set_option(root / "cove.toml", "resources", "memory", '"32M"')
    cove.ok("build", cwd=root)
    result = cove("run", "/bin/probe", "alloc", "256", cwd=root)
    assert "256 MB ok" not in result.stdout
    if detect_mode() == "rlimit":  # no cgroup here: malloc fails instead, and the program says so
        assert result.returncode == 1 and "alloc: failed" in result.stdout
        return
    assert result.returncode == 137
    assert error_line(result).startswith("cove: error: killed: out of memory (resources.memory = 32M)")


def test_script_whose_interpreter_is_missing(cove, unbuilt, tmp_path):
    root = tmp_path / "app"
    shutil.copytree(unbuilt, root, symlinks=True)
    script = root / "image" / "bin" / "tool"
    script.write_text("#!/usr/bin/python3 -u\nprint('hi')\n")
    script.chmod(0o755)
    built = cove.ok("build", cwd=root)
    assert built.stderr.strip() == (
        "cove: warning: /bin/tool starts with #!/usr/bin/python3, which is not "
        "in the image (add it with `cove add /usr/bin/python3`)"
    )
    result = cove("run", "/bin/tool", cwd=root)
    assert result.returncode == 126  # not 1, which the program itself might return
    assert error_line(result) == (
        "cove: error: /bin/tool needs /usr/bin/python3, which is not in the image "
        "(add it with `cove add /usr/bin/python3` and rebuild)"
    )


def _read_until(fd: int, marker: bytes, seen: bytearray, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while marker not in seen:
        assert time.monotonic() < end, f"no {marker!r} in {bytes(seen)!r}"
        if select.select([fd], [], [], 0.2)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:  # EIO: the other side is closed
                raise AssertionError(f"closed before {marker!r}: {bytes(seen)!r}") from None


def _reap(pid: int, timeout: float = 20) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError("cove run did not end after the shell's exit")


@pytest.fixture(scope="module")
def debug_app(cove, unbuilt, tmp_path_factory):
    root = tmp_path_factory.mktemp("debug") / "app"
    shutil.copytree(unbuilt, root, symlinks=True)
    set_option(root / "cove.toml", "enclave", "debug", "true")
    cove.ok("build", cwd=root)
    return root


def _on_a_terminal(cove, root) -> tuple[int, int]:
    """cove run --debug-enclave /bin/sh -i in a new session whose terminal is a pty, as a login shell's."""
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(root)
        os.execve(cove.popen_args()[0], cove.popen_args("run", "--debug-enclave", "/bin/sh", "-i"), cove.env)
    return pid, fd


def test_interactive_enclave_on_a_terminal(cove, debug_app):
    """A debug shell on a terminal gets its own, with job control, and its exit code comes back."""
    root = debug_app
    pid, fd = _on_a_terminal(cove, root)
    seen = bytearray()
    try:
        os.write(fd, b"sleep 30 & jobs; echo go-$((6*7))\n")
        _read_until(fd, b"go-42", seen)
        os.write(fd, b"fg\n")  # job control: the background job takes the terminal ...
        time.sleep(1)
        os.write(fd, b"\x03")  # ... and Ctrl-C stops it, not the shell
        os.write(fd, b"echo back-$((6*7)); exit 3\n")
        _read_until(fd, b"back-42", seen)
    finally:
        status = _reap(pid)
        os.close(fd)
    out = bytes(seen).decode(errors="replace")
    assert "Cannot set tty process group" not in out and "job control turned off" not in out, out
    assert "[1] + Running" in out and "sleep 30" in out
    assert os.waitstatus_to_exitcode(status) == 3


def test_sandbox_setup_failure_has_its_own_code(cove, unbuilt, tmp_path):
    """bwrap failing to set up the enclave (a file bound over a folder) is 125, not the program's 1."""
    root = tmp_path / "app"
    shutil.copytree(unbuilt, root, symlinks=True)
    with open(root / "cove.toml", "a") as handle:
        handle.write('[[mounts]]\ntarget = "/data"\ntype = "host"\nsource = "/etc/hostname"\n')
    cove.ok("build", cwd=root)
    result = cove("run", "/bin/sh", "-c", "exit 1", cwd=root)
    assert result.returncode == 125
    assert result.stderr.splitlines()[-1].startswith("cove: error: the sandbox could not set up the enclave")


def test_closing_the_terminal_ends_the_interactive_enclave(cove, debug_app):
    pid, fd = _on_a_terminal(cove, debug_app)
    seen = bytearray()
    os.write(fd, b"echo up-$((6*7))\n")
    _read_until(fd, b"up-42", seen)
    os.close(fd)  # the user's terminal goes away: the enclave's shell is hung up, cove returns
    status = _reap(pid)
    assert os.waitstatus_to_exitcode(status) != 0
