"""Findings of an attack on the sim sandbox, closed: terminal injection (TIOCSTI), syscalls newer than
libseccomp, and a few old ones no program needs. Each runs as root and as an unprivileged user.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess

import pytest

from cove.errors import SetupError
from cove.runtime import seccomp
from tests.conftest import require
from tests.e2e.helpers import make_instance

EPERM, ENOSYS = "denied Operation not permitted", "denied Function not implemented"


@pytest.fixture(scope="module")
def who(whoever):
    return whoever[0]


@pytest.fixture(scope="module")
def app(whoever):
    cove, parent, probe = whoever
    return make_instance(cove, parent, probe, name="hard", options={("enclave", "debug"): "true"})


def _on_a_pty(who, app, args: list[str], after: str = "") -> str:
    """`cove ARGS` under script(1) (a real pty, the caller's controlling terminal), then the shell
    reads what is waiting on that terminal for 2 s and runs it, as an interactive shell would."""
    command = shlex.join([*who.popen_args(*args)])
    shell = f'{command}{after}; echo "rc=$?"; read -t 2 x; echo "GOT:[$x]"; eval "$x"'
    silent, keep = os.pipe()  # script's stdin, open and silent: nothing but an injection reaches the pty
    try:
        result = subprocess.run(
            [require("script"), "-qec", shell, "/dev/null"],
            cwd=app,
            env=dict(who.env, SHELL="/bin/bash"),
            stdin=silent,
            capture_output=True,
            text=True,
            timeout=90,
        )
    finally:
        os.close(silent)
        os.close(keep)
    return result.stdout.replace("\r", "")


@pytest.mark.parametrize(
    "stdin",
    [
        " </dev/null",  # stdin not a terminal, stdout one: once the caller's session (finding M1)
        "",  # all on the terminal: the enclave's own pty, which TIOCSTI may not fill either
    ],
)
def test_no_keystrokes_reach_the_callers_shell(who, app, tmp_path, stdin):
    marker = tmp_path / "INJECTED"
    out = _on_a_pty(who, app, ["run", "--debug-enclave", "/bin/probe", "sti", f"touch {marker}\n"], stdin)
    assert "sti 0:" in out and "rc=0" in out, out  # it ran, and nothing went in anywhere
    assert "pushed" not in out and "GOT:[]" in out, out
    assert "\nsid 0\n" not in f"\n{out}", out  # a session of its own, not one outside the enclave
    for line in out.splitlines():
        if line.startswith("sti ") and "open" not in line:
            assert EPERM in line or "Inappropriate ioctl" in line, out
    assert not marker.exists()


def test_an_interrupt_of_a_debug_run_without_a_terminal_reaches_the_program(who, app):
    """^C at the user's terminal signals its foreground process group: the launcher's, which relays SIGINT to
    the program (in a session of its own). The sandbox's outer process is in a group of its own, so it is
    not killed under the program (which was exit 125, "the sandbox could not set up the enclave")."""
    process = subprocess.Popen(
        who.popen_args("run", "--debug-enclave", "/bin/probe", "wait"),
        cwd=app,
        env=who.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        os.killpg(process.pid, signal.SIGINT)  # what the terminal sends its foreground group
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130 and "could not set up" not in err, (process.returncode, err)


# x86_64 numbers: the reviewed new syscalls answer as documented, the unreviewed ENOSYS, the
# allowed ones still work; modify_ldt, sysfs, memfd_secret, kcmp, pidfd_getfd and process_madvise are
# denied by name.
@pytest.mark.parametrize(
    ("number", "expected"),
    [
        (457, EPERM),  # statmount
        (458, EPERM),  # listmount
        (467, EPERM),  # open_tree_attr
        (460, ENOSYS),  # lsm_set_self_attr
        (470, ENOSYS),  # beyond the review
        (548, ENOSYS),  # past x32's numbers, where new native ones go on
        (579, ENOSYS),
        (462, "allowed"),  # mseal of nothing
        (154, EPERM),  # modify_ldt
        (139, EPERM),  # sysfs
        (447, EPERM),  # memfd_secret
        (312, EPERM),  # kcmp
        (438, EPERM),  # pidfd_getfd
        (440, EPERM),  # process_madvise
    ],
)
def test_syscalls_newer_than_the_review_are_refused(who, app, number, expected):
    out = who("run", "--debug-enclave", "/bin/probe", "nr", str(number), cwd=app).stdout
    assert f"nr {number}: result: {expected}" in out, out


# terminal requests that would outlast the run (another line discipline, an exclusive terminal, output
# stopped) are denied whatever the descriptor: on stdin (/dev/null here) a request that got through would
# answer ENOTTY
@pytest.mark.parametrize("request_code", ["5423", "540c", "540a", "5412", "541c"])
def test_terminal_requests_that_outlast_the_run_are_denied(who, app, request_code):
    out = who("run", "--debug-enclave", "/bin/probe", "ioctl", request_code, cwd=app, input="").stdout
    assert f"ioctl {request_code}: result: {EPERM}" in out, out


def test_an_unknown_denied_name_fails_the_filter_build():
    with pytest.raises(SetupError, match="no_such_call"):
        seccomp.compile_filter("none", extra_denied=("no_such_call",))
