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
from cove.errors import CoveError
from cove.image import vmimage
from cove.runtime import vm, vm_tpmdev
from cove.runtime.vm_vtpm import Vtpm
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


@pytest.mark.parametrize("size", [9, 4097, 0xFFFFFFFF])
def test_a_malformed_command_gets_a_failure_and_the_device_goes_on(device, size):
    _, tpm, _, data = device
    data.sendall(struct.pack(">HII", 0x8001, size, 0x17E))
    assert response(data) == vm_tpmdev.FAILURE
    assert tpm.commands == 0  # never reached the swtpm
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
