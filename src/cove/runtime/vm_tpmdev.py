"""The VM's own vTPM as the guest's TPM 2.0 device (`[vm] tpm_device`, a measured `tpm-tis`).

QEMU's `-tpmdev emulator` drives a swtpm over two sockets: a control channel
(swtpm's CMD_* protocol) and a data channel it hands over with CMD_SET_DATAFD.
Connected to the swtpm directly, QEMU would own its only data channel (the
launcher quotes the vTPM for every report) and its CMD_INIT at machine start
would reset the TPM and wipe the launch PCR the launcher extended. So the
launcher is QEMU's emulator: this module answers the control channel itself
and relays each TPM command from QEMU's data channel to the swtpm, one whole
command and response at a time, taking turns with the launcher's own commands
(Vtpm.transmit). The TPM is already started and provisioned when QEMU starts:
INIT, STOP and SHUTDOWN are acknowledged and not passed on, so nothing the
machine does resets it; localities are acknowledged and not passed on either,
so every guest command runs at locality 0 (no PCR the guest could reset from a
higher locality). What QEMU sends is the guest's: a malformed command gets a
TPM failure response, never reaches the swtpm, and harms only the guest's TPM.

The guest shares the swtpm with the launcher, whose certified AK (persistent,
empty auth) signs the quote bound to every report. So the relay answers some
commands itself with a TPM error and never passes them on (`refusal`): any
command whose handle area names a launcher key (TPM_RC_HANDLE: with the AK the
guest could quote over another VM's report and splice it with this VM's
certified statement), and the commands that could make the launcher's later
quotes fail or lie (TPM_RC_COMMAND_CODE: clearing or disabling hierarchies,
changing seeds, hierarchy auth or policies, the dictionary-attack settings,
PCR banks, Startup and Shutdown, firmware upgrade). docs/backends.md.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import threading
from typing import TYPE_CHECKING

from cove.runtime.vm_vtpm import AK_HANDLE

if TYPE_CHECKING:
    from cove.runtime.vm_vtpm import Vtpm

# swtpm's control commands (its tpm_ioctl.h, "Commands used by the non-CUSE TPMs"): big-endian
CMD_GET_CAPABILITY, CMD_INIT, CMD_SHUTDOWN, CMD_GET_TPMESTABLISHED, CMD_SET_LOCALITY = 1, 2, 3, 4, 5
CMD_CANCEL_TPM_CMD, CMD_RESET_TPMESTABLISHED, CMD_STOP, CMD_SET_DATAFD, CMD_SET_BUFFERSIZE = 9, 11, 14, 16, 17
# the capabilities QEMU requires of a TPM 2.0 emulator, and cancel; no state blobs (no migration)
CAPABILITIES = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 5) | (1 << 7) | (1 << 10) | (1 << 12) | (1 << 13)
BUFFER_SIZE = 4096  # swtpm's and QEMU tpm-tis's largest command or response
MIN_BUFFER = 128
HEADER = 10  # tag (2), size (4), command code or response code (4)
TAG_SIZE = 6  # what QEMU's tpm-tis reads of a command before it knows its size
DRAIN_TIMEOUT = 0.2  # QEMU waits for the answer: what arrives before it belongs to the command being drained
TPM_RC_FAILURE = 0x101
TPM_RC_COMMAND_CODE = 0x143  # "command code not supported": what a TPM without the command answers
TPM_RC_HANDLE = 0x08B  # "the handle is not correct for the use", + 0x100 * N for the Nth handle (TPM_RC_H + TPM_RC_N)
FAILURE = struct.pack(">HII", 0x8001, HEADER, TPM_RC_FAILURE)
# the launcher's keys in the vTPM: the EK is transient during provisioning only (flushed), so the AK is all
LAUNCHER_HANDLES = frozenset({AK_HANDLE})
# how many handles each command's handle area has (TPM 2.0 Part 3); a code not here is scanned for
# UNKNOWN_HANDLES words: a false refusal of one of the guest's own commands is acceptable, a miss is not
HANDLES = {
    **dict.fromkeys((0x11F, 0x120, 0x122, 0x12F, 0x133, 0x134, 0x135, 0x136, 0x137, 0x138), 2),
    **dict.fromkeys((0x147, 0x148, 0x14A, 0x14B, 0x14C, 0x14E, 0x14F, 0x150, 0x151, 0x152), 2),
    **dict.fromkeys((0x160, 0x176, 0x185, 0x197), 2),
    **dict.fromkeys((0x149, 0x14D, 0x184, 0x192, 0x195), 3),
    **dict.fromkeys((0x121, 0x124, 0x125, 0x126, 0x127, 0x128, 0x129, 0x12A, 0x12B, 0x12C, 0x12D, 0x12E), 1),
    **dict.fromkeys((0x130, 0x131, 0x132, 0x139, 0x13A, 0x13B, 0x13C, 0x13D, 0x13E, 0x13F, 0x140), 1),
    **dict.fromkeys((0x153, 0x154, 0x155, 0x156, 0x157, 0x158, 0x159, 0x15B, 0x15C, 0x15D, 0x15E), 1),
    **dict.fromkeys((0x162, 0x163, 0x164, 0x168, 0x169, 0x16A, 0x16B, 0x16C, 0x16D, 0x16E, 0x16F), 1),
    **dict.fromkeys((0x170, 0x171, 0x172, 0x173, 0x174, 0x177, 0x17F, 0x180, 0x182, 0x183), 1),
    **dict.fromkeys((0x187, 0x188, 0x189, 0x18B, 0x18C, 0x18D, 0x18F, 0x190, 0x191, 0x193, 0x194), 1),
    **dict.fromkeys((0x196, 0x198, 0x199, 0x19A), 1),
    **dict.fromkeys((0x141, 0x142, 0x143, 0x144, 0x145, 0x146, 0x161, 0x165, 0x167, 0x178, 0x179), 0),
    **dict.fromkeys((0x17A, 0x17B, 0x17C, 0x17D, 0x17E, 0x181, 0x186, 0x18A, 0x18E), 0),
}
UNKNOWN_HANDLES = 3
TPM_CC_EVICT_CONTROL = 0x120  # its persistentHandle is its one parameter, the command's last 4 bytes
# commands that could make the launcher's later quotes fail or lie, or reset the vTPM under the launcher:
# Clear/ClearControl, HierarchyControl, ChangeEPS/ChangePPS (flush the AK's hierarchy or the seeds),
# HierarchyChangeAuth, SetPrimaryPolicy, DictionaryAttackLockReset/Parameters (lock the AK out),
# PCR_Allocate/PCR_SetAuthPolicy/PCR_SetAuthValue (the launch PCR's bank and auth), PP_Commands,
# SetAlgorithmSet, FieldUpgradeStart/Data, FirmwareRead, ClockSet/ClockRateAdjust (the quotes' clock),
# Startup and Shutdown (the TPM is started before QEMU; a Shutdown(STATE) would arm a later resume)
REFUSED_COMMANDS = frozenset(
    {0x126, 0x127, 0x121, 0x124, 0x125, 0x129, 0x12E, 0x139, 0x13A, 0x12B, 0x12C, 0x183}
    | {0x12D, 0x13F, 0x12F, 0x141, 0x179, 0x128, 0x130, 0x144, 0x145}
)
# bytes of each command's request after its code, and of its response (QEMU's tpm_emulator.c)
_REQUEST = {
    CMD_GET_CAPABILITY: 0,
    CMD_INIT: 4,
    CMD_SHUTDOWN: 0,
    CMD_GET_TPMESTABLISHED: 0,
    CMD_SET_LOCALITY: 4,
    CMD_CANCEL_TPM_CMD: 0,
    CMD_RESET_TPMESTABLISHED: 4,
    CMD_STOP: 0,
    CMD_SET_BUFFERSIZE: 4,
}


def _read(sock: socket.socket, size: int) -> bytes | None:
    """Exactly SIZE bytes, or None at the end of the connection."""
    data = b""
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


def refusal(command: bytes) -> int | None:
    """The TPM response code the relay answers ``command`` (whole, header included) with, or None to pass it on."""
    (code,) = struct.unpack(">I", command[6:10])
    if code in REFUSED_COMMANDS:
        return TPM_RC_COMMAND_CODE
    handles = min(HANDLES.get(code, UNKNOWN_HANDLES), (len(command) - HEADER) // 4)
    for index in range(handles):
        (handle,) = struct.unpack(">I", command[HEADER + 4 * index : HEADER + 4 * index + 4])
        if handle in LAUNCHER_HANDLES:
            return TPM_RC_HANDLE + 0x100 * (index + 1)
    if code == TPM_CC_EVICT_CONTROL and len(command) >= HEADER + 12:
        if struct.unpack(">I", command[-4:])[0] in LAUNCHER_HANDLES:
            return TPM_RC_HANDLE + 0x040 + 0x100  # TPM_RC_P + TPM_RC_1: its first parameter
    return None


def _error(code: int) -> bytes:
    return struct.pack(">HII", 0x8001, HEADER, code)


def _close(fds: list[int]) -> None:
    """Close descriptors that came with a control command and are not kept (any kind: a pipe is no socket)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def control_answer(command: int, request: bytes) -> bytes | None:
    """The answer to one control command (not SET_DATAFD), or None for one this emulator does not offer."""
    if command == CMD_GET_CAPABILITY:
        return struct.pack(">Q", CAPABILITIES)
    if command == CMD_GET_TPMESTABLISHED:
        return struct.pack(">IB3x", 0, 0)  # ptm_est: result, bit, padding
    if command == CMD_SET_BUFFERSIZE:
        (wanted,) = struct.unpack(">I", request)
        size = BUFFER_SIZE if wanted == 0 else min(max(wanted, MIN_BUFFER), BUFFER_SIZE)
        return struct.pack(">IIII", 0, size, MIN_BUFFER, BUFFER_SIZE)
    if command in _REQUEST:  # INIT, SHUTDOWN, STOP, SET_LOCALITY, RESET_TPMESTABLISHED, CANCEL: done
        return struct.pack(">I", 0)
    return None


class TpmDevice:
    """QEMU's end of the control channel (``qemu_end``, passed to `-chardev socket,fd=`) and the
    threads that answer it and relay the data channel to ``vtpm`` until QEMU is gone."""

    def __init__(self, vtpm: Vtpm) -> None:
        self.vtpm = vtpm
        self.control, self.qemu_end = socket.socketpair()
        self.data: socket.socket | None = None
        self.commands = 0  # TPM commands relayed (for tests and timings)
        self._thread = threading.Thread(target=self._serve_control, daemon=True)
        self._thread.start()

    def handed_over(self) -> None:
        """QEMU has its end (it was started with it): close the launcher's copy."""
        self.qemu_end.close()

    def close(self) -> None:
        for sock in (self.control, self.qemu_end, self.data):
            if sock is not None:
                sock.close()

    def _serve_control(self) -> None:
        try:
            self._answer_control()
        except OSError:  # the channel broke: QEMU is gone, or the guest's machine sent what no QEMU sends
            pass
        self.control.close()

    def _answer_control(self) -> None:
        while True:
            received = self._read_code()
            if received is None:
                return
            command, fds = received
            if command == CMD_SET_DATAFD:
                answer = self._take_data_channel(fds)
            else:
                _close(fds)  # only SET_DATAFD brings one
                request = _read(self.control, _REQUEST.get(command, 0))
                answer = None if request is None else control_answer(command, request)
            if answer is None:  # not QEMU's: the channel is not understood any more
                return
            self.control.sendall(answer)

    def _read_code(self) -> tuple[int, list[int]] | None:
        """A command's 4-byte code and the descriptors that came with it (SCM_RIGHTS)."""
        data, fds = b"", []
        while len(data) < 4:
            try:
                chunk, more, _, _ = socket.recv_fds(self.control, 4 - len(data), 1)
            except OSError:
                chunk, more = b"", []
            fds += more
            if not chunk:
                _close(fds)
                return None
            data += chunk
        return struct.unpack(">I", data)[0], fds

    def _take_data_channel(self, fds: list[int]) -> bytes | None:
        """SET_DATAFD: QEMU's data socket, taken once; the relay starts on it. Anything else ends the channel."""
        if len(fds) != 1 or self.data is not None or not stat.S_ISSOCK(os.fstat(fds[0]).st_mode):
            _close(fds)
            return None
        self.data = socket.socket(fileno=fds[0])
        threading.Thread(target=self._relay, args=(self.data,), daemon=True).start()
        return struct.pack(">I", 0)

    def _relay(self, data: socket.socket) -> None:
        """Each command QEMU sends, whole, to the swtpm (unless `refusal` answers it); its response, whole, back.

        Framed as QEMU's tpm-tis sends: the bytes the guest wrote, which end at the header's size once
        6 bytes are in, and stop at its 4096-byte buffer. So 6 bytes first; a size below 10 brings
        max(0, size - 6) more, a size above 4096 at most 4090 more, and each gets a failure response.
        """
        while True:
            head = _read(data, TAG_SIZE)
            if head is None:
                return
            (size,) = struct.unpack(">I", head[2:6])
            if size < HEADER:
                if size > TAG_SIZE and _read(data, size - TAG_SIZE) is None:
                    return
                response = FAILURE
            elif size > BUFFER_SIZE:
                if not _drain(data, BUFFER_SIZE - TAG_SIZE):
                    return
                response = FAILURE
            else:
                rest = _read(data, size - TAG_SIZE)
                if rest is None:
                    return
                refused = refusal(head + rest)
                if refused is not None:
                    response = _error(refused)
                else:
                    try:
                        response = self.vtpm.transmit(head + rest)
                    except OSError:
                        response = FAILURE
                    self.commands += 1
            try:
                data.sendall(response)
            except OSError:
                return


def _drain(sock: socket.socket, most: int) -> bool:
    """Discard up to ``most`` bytes of an oversized command: those that arrive before a short quiet
    (QEMU sends nothing more until it has the answer). False at the end of the connection."""
    sock.settimeout(DRAIN_TIMEOUT)
    try:
        while most > 0:
            try:
                chunk = sock.recv(most)
            except TimeoutError:
                return True
            if not chunk:
                return False
            most -= len(chunk)
        return True
    except OSError:
        return False
    finally:
        try:
            sock.settimeout(None)
        except OSError:
            pass
