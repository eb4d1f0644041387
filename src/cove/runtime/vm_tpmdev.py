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
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import TYPE_CHECKING

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
TPM_RC_FAILURE = 0x101
FAILURE = struct.pack(">HII", 0x8001, HEADER, TPM_RC_FAILURE)
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
        while True:
            received = self._read_code()
            if received is None:
                return
            command, fds = received
            if command == CMD_SET_DATAFD:
                answer = self._take_data_channel(fds)
            else:
                for fd in fds:  # only SET_DATAFD brings one
                    socket.socket(fileno=fd).close()
                request = _read(self.control, _REQUEST.get(command, 0))
                answer = None if request is None else control_answer(command, request)
            if answer is None:  # not QEMU's: the channel is not understood any more
                self.control.close()
                return
            try:
                self.control.sendall(answer)
            except OSError:
                return

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
                for fd in fds:
                    socket.socket(fileno=fd).close()
                return None
            data += chunk
        return struct.unpack(">I", data)[0], fds

    def _take_data_channel(self, fds: list[int]) -> bytes | None:
        """SET_DATAFD: QEMU's data socket, taken once; the relay starts on it."""
        if len(fds) != 1 or self.data is not None:
            for fd in fds:
                socket.socket(fileno=fd).close()
            return None
        self.data = socket.socket(fileno=fds[0])
        threading.Thread(target=self._relay, args=(self.data,), daemon=True).start()
        return struct.pack(">I", 0)

    def _relay(self, data: socket.socket) -> None:
        """Each command QEMU sends, whole, to the swtpm; its response, whole, back."""
        while True:
            head = _read(data, HEADER)
            if head is None:
                return
            (size,) = struct.unpack(">I", head[2:6])
            if not HEADER <= size <= BUFFER_SIZE:
                response = FAILURE
            else:
                rest = _read(data, size - HEADER)
                if rest is None:
                    return
                try:
                    response = self.vtpm.transmit(head + rest)
                except OSError:
                    response = FAILURE
                self.commands += 1
            try:
                data.sendall(response)
            except OSError:
                return
