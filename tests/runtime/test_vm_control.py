"""The launcher's side of a `vm` guest's cove.ctl lines, against a hostile guest, without a boot.

A small process stands in for QEMU: it holds the guest ends of the ports, writes the lines a
compromised guest might, and powers off (exits). The launcher (cove.runtime.vm.VmEnclave) must drop
numbers that are not ASCII digits ('²' passes str.isdigit(), then int() refuses it: that killed the
control thread), and end the run with one line when a line never ends (it kept every byte). The exec
helper (cove.runtime.vm_exec.relay) ends its session with one line on an exit code that is not one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from cove.errors import CoveError
from cove.runtime import vm, vm_exec

# the fake guest: argv[1] is its cove.ctl descriptor, argv[2] a JSON list of what to do in turn
GUEST = """
import json, os, sys, time
ctl = int(sys.argv[1])
for step in json.loads(sys.argv[2]):
    if step[0] in ("send", "send no end"):
        data = step[1].encode() if step[0] == "send" else b"o1:" + b"41" * step[1]  # "send no end": bytes, no newline
        while data:
            data = data[os.write(ctl, data):]
    elif step[0] == "read line":  # the host's next line (an exec request)
        line = b""
        while not line.endswith(b"\\n"):
            line += os.read(ctl, 1)
    elif step[0] == "sleep":
        time.sleep(step[1])
"""


def enclave(tmp_path: Path, steps: list) -> vm.VmEnclave:
    ports = vm.SerialPorts()  # the launcher's own: the fake guest gets one end of each
    guest = subprocess.Popen(
        [sys.executable, "-c", GUEST, str(ports.guest_fds()[0]), json.dumps(steps)],
        stdin=subprocess.DEVNULL,
        pass_fds=ports.guest_fds(),
    )
    ports.close_guest_ends()
    spec = SimpleNamespace(instance_id="i", config=SimpleNamespace(vm=SimpleNamespace(boot_timeout=30.0)))
    return vm.VmEnclave(spec, vm.TCG, guest, ports, tmp_path, time.monotonic())  # type: ignore[arg-type]


HOSTILE = ["o²:00", "e1²:00", "x²:0", "r٣:no", "i²:5", "X²", "X٣", "X1234", "X-1", "X", "o:00", "x99999999999:0"]


def test_lines_whose_numbers_are_not_ascii_digits_are_dropped(tmp_path):
    """Each hostile line is dropped; the control thread lives on and takes the real exit code."""
    steps = [["send", "".join(line + "\n" for line in HOSTILE)], ["send", "X7\n"]]
    run = enclave(tmp_path, steps)
    assert run.wait() == 7
    assert run.host_error is None and run.guest_error is None


def test_a_line_without_end_ends_the_run_with_one_line(tmp_path):
    """10 MiB and no newline: the launcher holds at most GUEST_LINE of it, kills the guest, says so."""
    run = enclave(tmp_path, [["send no end", 5 << 20], ["sleep", 30]])
    began = time.monotonic()
    with pytest.raises(CoveError) as caught:
        run.wait()
    assert f"control line longer than {vm.GUEST_LINE} bytes" in caught.value.line()
    assert "\n" not in caught.value.line()
    assert time.monotonic() - began < 20  # the guest was killed, not waited for
    assert run.process.poll() is not None


def test_an_input_acknowledgement_that_is_not_a_number_is_dropped(tmp_path):
    """`i<id>:<bytes>` with '²' as the count (an exec session must exist for it to be read)."""
    steps = [
        ["send", "R\n"],
        ["read line"],  # the launcher's x1... request
        ["send", "i1:²\n" + "i1:٣\n" + "o1:6869\n" + "x1:0\n"],
        ["read line"],  # the launcher's acknowledgement of the o line: the session went on
        ["send", "X0\n"],
    ]
    run = enclave(tmp_path, steps)
    path = tmp_path / vm.EXEC_SOCKET
    deadline = time.monotonic() + 20
    while not path.exists():
        assert time.monotonic() < deadline, "the launcher took no exec socket after R"
        time.sleep(0.01)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(20)
        client.connect(str(path))
        client.sendall(json.dumps({"argv": ["/bin/cat"], "stdin": True}).encode() + b"\n")
        got = b""
        while not got.endswith(b"x1:0\n"):
            chunk = client.recv(4096)
            assert chunk, got
            got += chunk
    assert got == b"o1:6869\nx1:0\n"
    assert run.wait() == 0


@pytest.mark.parametrize("value", ["²", "٣", "1234", "-1", "", " 1"])
def test_the_exec_helper_ends_on_an_exit_code_that_is_not_one(value, capfd):
    """vm_exec.relay: one line on stderr and 125, not a traceback, nor reading on past it."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"o1:6869\nx1:" + value.encode() + b"\nx1:0\n")
        theirs.shutdown(socket.SHUT_WR)
        out_read, out_write = os.pipe()
        code = vm_exec.relay(ours, out_write, 2)
        os.close(out_write)
        with os.fdopen(out_read, "rb") as out:
            assert out.read() == b"hi"
    assert code == vm_exec.ENDED
    err = capfd.readouterr().err
    assert err == "cove: the vm guest sent a malformed exit code\n"
