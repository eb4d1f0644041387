"""The launcher as QEMU's TPM emulator (cove.runtime.vm_tpmdev), driven as QEMU drives it, against a real swtpm.

No VM boots here: the test speaks QEMU's side of the control channel (the
commands and sizes of QEMU's tpm_emulator.c) and sends TPM commands on the data
socket it hands over, as the guest's tpm-tis would have QEMU send them.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
from pathlib import Path

import pytest

from cove import config as cove_config
from cove.attest import evidence as ev
from cove.attest.tpm_structs import parse_public
from cove.errors import CoveError
from cove.image import vmimage
from cove.runtime import vm, vm_tpmdev
from cove.runtime.vm_vtpm import AK_HANDLE, Vtpm
from tests.conftest import require

LAUNCH = hashlib.sha256(b"a launch description").digest()


def pcr_read(pcr: int) -> bytes:
    """TPM2_PCR_Read of one sha256 PCR."""
    select = bytearray(3)
    select[pcr // 8] |= 1 << (pcr % 8)
    body = struct.pack(">IHB", 1, 0x000B, 3) + bytes(select)
    return struct.pack(">HII", 0x8001, 10 + len(body), 0x17E) + body


def pcr_extend(pcr: int, digest: bytes) -> bytes:
    """TPM2_PCR_Extend with an empty password session (what the guest's root may send)."""
    auth = struct.pack(">IHBH", 0x40000009, 0, 0, 0)
    body = struct.pack(">I", pcr) + struct.pack(">I", len(auth)) + auth + struct.pack(">IH", 1, 0x000B) + digest
    return struct.pack(">HII", 0x8002, 10 + len(body), 0x182) + body


def pcr_reset(pcr: int) -> bytes:
    """TPM2_PCR_Reset with an empty password session."""
    auth = struct.pack(">IHBH", 0x40000009, 0, 0, 0)
    body = struct.pack(">I", pcr) + struct.pack(">I", len(auth)) + auth
    return struct.pack(">HII", 0x8002, 10 + len(body), 0x13D) + body


PASSWORD = struct.pack(">IHBH", 0x40000009, 0, 0, 0)  # TPMS_AUTH_COMMAND: TPM_RS_PW, no nonce, empty password
OWNER, LOCKOUT, ENDORSEMENT, PLATFORM, NULL = 0x40000001, 0x4000000A, 0x4000000B, 0x4000000C, 0x40000007


def command(code: int, handles: list[int], params: bytes = b"", auth: bool = True, password: bytes = b"") -> bytes:
    """A TPM 2.0 command: handle area, one password session if ``auth``, then ``params``."""
    body = b"".join(struct.pack(">I", h) for h in handles)
    session = PASSWORD[:-2] + struct.pack(">H", len(password)) + password
    body += struct.pack(">I", len(session)) + session if auth else b""
    return struct.pack(">HII", 0x8002 if auth else 0x8001, 10 + len(body) + len(params), code) + body + params


def quote(handle: int, qualifying: bytes) -> bytes:
    """TPM2_Quote of the launch PCR (sha256) with ``handle``, scheme NULL: what the R3 probe sent."""
    select = bytearray(3)
    select[ev.LAUNCH_PCR // 8] |= 1 << (ev.LAUNCH_PCR % 8)
    params = struct.pack(">H", len(qualifying)) + qualifying + struct.pack(">HIHB", 0x0010, 1, 0x000B, 3) + select
    return command(0x158, [handle], params)


def rc(answer: bytes) -> int:
    return int(struct.unpack(">I", answer[6:10])[0])


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the emulator closed the channel"
        data += chunk
    return data


def response(sock: socket.socket) -> bytes:
    head = read_exactly(sock, 10)
    return head + read_exactly(sock, struct.unpack(">I", head[2:6])[0] - 10)


def control(sock: socket.socket, command: int, request: bytes, answer: int) -> bytes:
    sock.sendall(struct.pack(">I", command) + request)
    return read_exactly(sock, answer)


@pytest.fixture
def device(tmp_path):
    """A provisioned vTPM and the emulator in front of it; QEMU's control end and its data socket."""
    require("swtpm")
    vtpm = Vtpm.start(tmp_path)
    try:
        vtpm.provision(LAUNCH)
        device = vm_tpmdev.TpmDevice(vtpm)
        qemu, ours = socket.socketpair()
        ctrl = device.qemu_end
        socket.send_fds(ctrl, [struct.pack(">I", vm_tpmdev.CMD_SET_DATAFD)], [ours.fileno()])
        ours.close()
        assert read_exactly(ctrl, 4) == bytes(4)
        qemu.settimeout(10)  # a relay that waits for bytes QEMU never sends fails the test, never hangs it
        ctrl.settimeout(10)
        yield vtpm, device, ctrl, qemu
        device.close()
        qemu.close()
    finally:
        vtpm.stop()


def test_qemu_start_leaves_the_launch_pcr_and_commands_are_relayed(device):
    vtpm, tpm, ctrl, data = device
    (caps,) = struct.unpack(">Q", control(ctrl, vm_tpmdev.CMD_GET_CAPABILITY, b"", 8))
    required = 0x1 | 0x2 | 0x4 | 0x8 | 0x80 | 0x1000 | 0x400 | 0x2000  # QEMU's minimum for a TPM 2.0
    assert caps & required == required and not caps & (1 << 8)  # no state blobs: no migration
    # what QEMU does at machine start: stop, buffer size, init (which on a swtpm would reset the PCRs)
    assert control(ctrl, vm_tpmdev.CMD_STOP, b"", 4) == bytes(4)
    assert control(ctrl, vm_tpmdev.CMD_SET_BUFFERSIZE, struct.pack(">I", 0), 16) == struct.pack(
        ">IIII", 0, 4096, 128, 4096
    )
    assert control(ctrl, vm_tpmdev.CMD_SET_BUFFERSIZE, struct.pack(">I", 64), 16)[4:8] == struct.pack(">I", 128)
    assert control(ctrl, vm_tpmdev.CMD_INIT, bytes(4), 4) == bytes(4)
    assert control(ctrl, vm_tpmdev.CMD_SET_LOCALITY, b"\x04\0\0\0", 4) == bytes(4)
    assert control(ctrl, vm_tpmdev.CMD_GET_TPMESTABLISHED, b"", 8) == bytes(8)
    assert control(ctrl, vm_tpmdev.CMD_RESET_TPMESTABLISHED, b"\x04\0\0\0", 4) == bytes(4)
    data.sendall(pcr_read(ev.LAUNCH_PCR))
    answer = response(data)
    assert answer[6:10] == bytes(4) and answer[-32:] == ev.launch_pcr_value(LAUNCH)
    # no reset of the launch PCR, whatever locality the guest asked for (it was acknowledged above)
    data.sendall(pcr_reset(ev.LAUNCH_PCR))
    assert response(data)[6:10] != bytes(4)
    # the guest extends the launch PCR: one-way, and the launcher's next quote shows it
    data.sendall(pcr_extend(ev.LAUNCH_PCR, b"\x11" * 32))
    assert response(data)[6:10] == bytes(4)
    _, _, pcrs = vtpm.quote(b"q" * 32)
    assert pcrs["sha256"][ev.LAUNCH_PCR] == hashlib.sha256(ev.launch_pcr_value(LAUNCH) + b"\x11" * 32).digest()
    assert tpm.commands == 3


# what QEMU's tpm-tis sends for a header size: the guest's bytes stop at the size once 6 are in, and at 4096
@pytest.mark.parametrize(
    ("size", "sent"), [(0, 6), (6, 6), (9, 9), (4097, 4096), (0xFFFFFFFF, 4096), (0xFFFFFFFF, 100)]
)
def test_a_malformed_command_gets_a_failure_and_the_device_goes_on(device, size, sent):
    _, tpm, _, data = device
    data.sendall((struct.pack(">HII", 0x8001, size, 0x17E) + pcr_read(ev.LAUNCH_PCR) * 400)[:sent])
    assert response(data) == vm_tpmdev.FAILURE
    assert tpm.commands == 0  # never reached the swtpm, and no rest of it was taken for a command
    data.sendall(pcr_read(ev.LAUNCH_PCR))
    assert response(data)[-32:] == ev.launch_pcr_value(LAUNCH)
    data.settimeout(0.5)
    with pytest.raises(TimeoutError):  # one answer per command QEMU sent
        data.recv(1)


def test_the_guest_cannot_quote_with_the_launchers_ak(device):
    """R3 H1: the AK's quote over another VM's report (to splice with this VM's statement) is refused."""
    vtpm, tpm, _, data = device
    other_report = b"another VM's report"
    data.sendall(quote(AK_HANDLE, ev.vm_quote_qualifier(other_report)))
    assert response(data) == struct.pack(">HII", 0x8001, 10, vm_tpmdev.TPM_RC_HANDLE + 0x100)
    assert tpm.commands == 0
    attest, _, _ = vtpm.quote(ev.vm_quote_qualifier(b"this VM's report"))  # the launcher's quotes go on
    assert ev.vm_quote_qualifier(b"this VM's report") in attest


# every place a command names the AK; ReadPublic too: the guest has no use for the launcher's key
@pytest.mark.parametrize(
    ("cmd", "code"),
    [
        (command(0x173, [AK_HANDLE], auth=False), 0x18B),  # ReadPublic
        (command(0x148, [0x80000000, AK_HANDLE], bytes(6)), 0x28B),  # Certify signed by the AK
        (command(0x120, [OWNER, AK_HANDLE], struct.pack(">I", AK_HANDLE)), 0x28B),  # EvictControl of the AK
        (command(0x120, [OWNER, 0x80000000], struct.pack(">I", AK_HANDLE)), 0x1CB),  # ... or onto its handle
        (command(0x176, [NULL, AK_HANDLE], bytes(8), auth=False), 0x28B),  # StartAuthSession bound to it
        (command(0x150, [AK_HANDLE, 0x80000000], bytes(4)), 0x18B),  # ObjectChangeAuth
        (command(0x1FF, [OWNER, 0x80000001, AK_HANDLE]), 0x38B),  # a code the relay does not know
    ],
    ids=["readpublic", "certify", "evict", "evict-onto", "session-bind", "changeauth", "unknown-code"],
)
def test_no_command_naming_the_launchers_ak_reaches_the_vtpm(device, cmd, code):
    _, tpm, _, data = device
    data.sendall(cmd)
    assert rc(response(data)) == code and tpm.commands == 0


def test_the_guest_cannot_clear_lock_or_reconfigure_the_vtpm(device):
    """R3 L3: each would flush or lock out the AK, or change what the launcher's quotes say; all are refused."""
    vtpm, tpm, _, data = device
    refused = [
        command(0x126, [LOCKOUT]),  # Clear: flushes the AK
        command(0x127, [PLATFORM], b"\0"),  # ClearControl
        command(0x121, [PLATFORM], struct.pack(">IB", ENDORSEMENT, 0)),  # HierarchyControl: the AK's hierarchy off
        command(0x124, [PLATFORM]),  # ChangeEPS
        command(0x125, [PLATFORM]),  # ChangePPS
        command(0x12E, [ENDORSEMENT], struct.pack(">HH", 0, 0x000B)),  # SetPrimaryPolicy
        command(0x139, [LOCKOUT]),  # DictionaryAttackLockReset
        command(0x13A, [LOCKOUT], struct.pack(">III", 0, 1000, 1000)),  # DictionaryAttackParameters: maxTries 0
        command(0x129, [LOCKOUT], struct.pack(">H", 4) + b"1234"),  # HierarchyChangeAuth
        command(0x129, [OWNER], struct.pack(">H", 4) + b"1234"),
        command(0x12B, [PLATFORM], struct.pack(">I", 0)),  # PCR_Allocate
        command(0x12C, [PLATFORM], bytes(8)),  # PCR_SetAuthPolicy
        command(0x183, [ev.LAUNCH_PCR], struct.pack(">H", 4) + b"1234"),  # PCR_SetAuthValue
        command(0x128, [OWNER], struct.pack(">Q", 1 << 40)),  # ClockSet
        command(0x144, [], struct.pack(">H", 0), auth=False),  # Startup(CLEAR)
        command(0x145, [], struct.pack(">H", 1), auth=False),  # Shutdown(STATE)
    ]
    for cmd in refused:
        data.sendall(cmd)
        assert response(data) == struct.pack(">HII", 0x8001, 10, vm_tpmdev.TPM_RC_COMMAND_CODE), cmd.hex()
    assert tpm.commands == 0
    vtpm.quote(b"q" * 32)  # the AK is still there and usable


def test_a_lockout_the_guest_triggers_with_its_own_key_leaves_the_ak(device):
    """R3 L3: wrong passwords for the guest's own key lock the vTPM's DA-protected objects out; the AK has noDA."""
    vtpm, tpm, _, data = device
    folder = vtpm.folder / "guest"
    folder.mkdir()
    # the guest's own key with a password (tpm2-tools here; the relay passes CreatePrimary and EvictControl alike)
    vtpm.tpm.run("tpm2_createprimary", "-C", "o", "-c", str(folder / "key.ctx"), "-p", "secret")
    vtpm.tpm.run("tpm2_evictcontrol", "-C", "o", "-c", str(folder / "key.ctx"), "0x81000020")
    vtpm.tpm.flush()
    answers: list[int] = []
    while 0x921 not in answers and len(answers) < 10:  # swtpm's maxTries is 3
        data.sendall(command(0x153, [0x81000020], password=b"wrong"))  # TPM2_Create under it
        answers.append(rc(response(data)))
    # TPM_RC_AUTH_FAIL (session 1) or TPM_RC_RETRY (the failure count is being written), then TPM_RC_LOCKOUT
    assert 0x98E in answers and answers[-1] == 0x921 and set(answers) <= {0x98E, 0x922, 0x921}, answers
    attest, _, _ = vtpm.quote(b"q" * 32)  # the launcher's quote still works
    assert b"q" * 32 in attest
    assert vtpm.statement is not None and parse_public(vtpm.statement.ak).object_attributes & 0x400  # noDA


@pytest.mark.parametrize("command", [vm_tpmdev.CMD_SET_DATAFD, vm_tpmdev.CMD_GET_CAPABILITY])
def test_a_descriptor_that_is_no_socket_is_closed_and_the_control_thread_lives(device, command):
    """R3 L2: a pipe sent with a control command is closed (the other end sees EPIPE), never wrapped."""
    _, tpm, ctrl, data = device
    read_end, write_end = os.pipe()
    try:
        socket.send_fds(ctrl, [struct.pack(">I", command)], [read_end])
        os.close(read_end)
        ctrl.settimeout(10)
        if command == vm_tpmdev.CMD_SET_DATAFD:  # a second data channel: the control channel ends
            assert ctrl.recv(64) == b""
        else:
            assert read_exactly(ctrl, 8) == struct.pack(">Q", vm_tpmdev.CAPABILITIES)
        with pytest.raises(BrokenPipeError):
            os.write(write_end, b"x")
    finally:
        os.close(write_end)
    data.sendall(pcr_read(ev.LAUNCH_PCR))
    assert response(data)[-32:] == ev.launch_pcr_value(LAUNCH)


@pytest.mark.parametrize("command", [vm_tpmdev.CMD_SET_DATAFD, 12, 13, 0x13, 0xFFFFFFFF])
def test_control_commands_qemu_does_not_send_here_end_the_channel(device, command):
    _, _, ctrl, data = device
    # a second data channel, state blobs (migration), storage locks, unknown codes
    ctrl.sendall(struct.pack(">I", command) + bytes(16))
    ctrl.settimeout(10)
    try:
        assert ctrl.recv(64) == b""  # closed, or reset with the request's rest unread
    except ConnectionResetError:
        pass
    data.sendall(pcr_read(ev.LAUNCH_PCR))  # the data channel QEMU already has goes on
    assert response(data)[-32:] == ev.launch_pcr_value(LAUNCH)


def test_the_guest_waits_for_the_launch_pcr(tmp_path):
    """A command before provisioning is held until the launch PCR is extended, never answered from a fresh TPM."""
    require("swtpm")
    vtpm = Vtpm.start(tmp_path)
    try:
        result: list[bytes] = []
        waiter = threading.Thread(target=lambda: result.append(vtpm.transmit(pcr_read(ev.LAUNCH_PCR))))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not result
        vtpm.provision(LAUNCH)
        waiter.join(10)
        assert result and result[0][-32:] == ev.launch_pcr_value(LAUNCH)
    finally:
        vtpm.stop()
    assert not os.path.exists(vtpm.folder)


def _description(tpm: bool) -> dict:
    config = cove_config.parse(f'[enclave]\nname = "x"\nbackend = "vm"\n[vm]\ntpm_device = {str(tpm).lower()}\n')
    return vmimage.describe(bytes(32), bytes(32), 4 << 20, config)


def test_the_device_is_measured_and_attached_only_with_the_vtpm() -> None:
    require("qemu-system-x86_64")
    without, with_device = _description(False), _description(True)
    assert vmimage.TPM_DEVICE in with_device["devices"] and vmimage.TPM_CMDLINE in with_device["cmdline"]
    assert vmimage.TPM_DEVICE not in without["devices"] and "tpm_tis" not in without["cmdline"]
    assert vmimage.measure(without) != vmimage.measure(with_device)
    fds = list(range(100, 100 + len(vmimage.PORTS)))
    args = vm.qemu_arguments(with_device, Path("k"), Path("i"), "tcg", Path("c"), fds, tpm=99)
    assert args[args.index("-tpmdev") + 1] == "emulator,id=tpm0,chardev=tpm" and "tpm-tis,tpmdev=tpm0" in args
    assert "socket,id=tpm,fd=99" in args
    assert "-tpmdev" not in vm.qemu_arguments(without, Path("k"), Path("i"), "tcg", Path("c"), fds, tpm=99)
    with pytest.raises(CoveError, match="no vTPM"):  # never a build's device silently left out
        vm.qemu_arguments(with_device, Path("k"), Path("i"), "tcg", Path("c"), fds)


def test_a_build_with_the_device_is_refused_without_a_vtpm() -> None:
    """No platform key, so no vTPM: the run stops with one line, never boots without the measured device."""
    backend = vm.VmBackend()
    with pytest.raises(CoveError, match="no key to certify a vTPM"):
        backend.attach_tpm()
