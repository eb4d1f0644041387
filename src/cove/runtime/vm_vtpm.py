"""One vTPM per `vm` enclave: a swtpm the launcher starts, provisions and quotes.

The launcher, not the guest init, extends the launch measurement into the
vTPM's launch PCR, after the swtpm starts and before the guest receives its
launch request (so before the program can run). The launcher is the party
that checked the kernel, initramfs and launch description against the
signed manifest; the guest cannot hash the kernel it runs on, so an
extension by the init would only repeat a value the host handed it. The
platform key then certifies the vTPM's EK and AK together with that launch
measurement (attest.evidence.VtpmStatement), and every quote the guest asks
for through /dev/attestation carries a vTPM quote of the launch PCR whose
qualifying data is bound to the platform's report (docs/backends.md).

The swtpm listens on a Unix socket in the run's private folder (mode 0700),
never on a network port, and dies with the launcher (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from cove import util
from cove.attest import evidence as ev
from cove.attest.tpm_structs import parse_pcr_file
from cove.errors import CoveError, SetupError
from cove.platform.reports import ReportSigner
from cove.platform.tpm2 import Tpm
from cove.runtime.backend import find_tool

AK_HANDLE = 0x81000010
SOCKET = "tpm.sock"
START_TIMEOUT = 10.0
RESPONSE_HEADER = 10  # tag, size, response code
MAX_RESPONSE = 4096  # swtpm's buffer: no response is longer


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise OSError("the swtpm closed the connection mid-response")
        data += chunk
    return data


def _die_with_parent() -> None:
    util.die_with_parent(signal.SIGKILL)


def _tool(name: str, package: str) -> str:
    path = find_tool(name)
    if path is None:
        raise SetupError(f"{name} is not installed; the vm backend's vTPM needs it", f"run scripts/setup ({package})")
    return path


class Vtpm:
    """A running swtpm for one VM; :meth:`provision` extends the launch PCR, :meth:`quote` quotes it."""

    def __init__(self, folder: Path, process: subprocess.Popen[bytes]) -> None:
        self.folder = folder
        self.process = process
        # relative to the folder: a run's private folder can be deeper than a socket path may be long
        self.tpm = Tpm(f"cmd:cd {shlex.quote(str(folder))} && exec {_tool('socat', 'socat')} - UNIX-CONNECT:{SOCKET}")
        self.statement: ev.VtpmStatement | None = None
        self._lock = threading.Lock()
        self._provisioned = threading.Event()  # the guest's TPM commands (transmit) wait for it

    @classmethod
    def start(cls, parent: Path) -> Vtpm:
        """Start a fresh swtpm in a new private folder under ``parent`` (call from the launching thread)."""
        swtpm = _tool("swtpm", "swtpm")
        _tool("socat", "socat")  # checked before anything starts, so a missing tool leaves nothing running
        _tool("tpm2_quote", "tpm2-tools")
        folder = Path(tempfile.mkdtemp(prefix="vtpm-", dir=parent))
        (folder / "state").mkdir(mode=0o700)
        log = open(folder / "swtpm.log", "wb")
        try:
            process = subprocess.Popen(
                [
                    swtpm,
                    "socket",
                    "--tpm2",
                    "--tpmstate",
                    f"dir={folder / 'state'}",
                    "--server",
                    f"type=unixio,path={SOCKET}",
                    "--flags",
                    "not-need-init,startup-clear",
                ],
                cwd=folder,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                close_fds=True,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()
        vtpm = cls(folder, process)
        deadline = time.monotonic() + START_TIMEOUT
        while not (folder / SOCKET).exists():
            if process.poll() is not None or time.monotonic() > deadline:
                reason = (folder / "swtpm.log").read_text(errors="replace").strip().splitlines()[-1:]
                vtpm.stop()
                raise CoveError(
                    f"the vm's swtpm did not start (exit status {process.poll()}"
                    + (f": {reason[0][:200]}" if reason else "")
                    + ")"
                )
            time.sleep(0.005)
        return vtpm

    def provision(self, launch: bytes) -> ev.VtpmStatement:
        """Make an ECC EK and an AK (noDA) under it, extend the launch PCR once; what the platform key certifies."""
        with self._lock, tempfile.TemporaryDirectory(dir=self.folder) as tmp:
            t = Path(tmp)  # a fresh TPM: nothing to flush before the first command
            self.tpm.run("tpm2_createek", "-c", str(t / "ek.ctx"), "-G", "ecc", "-u", str(t / "ek.pub"))
            self.tpm.create_ak_in(t / "ek.ctx", t, no_da=True)  # the guest's lockouts never stop its quotes
            self.tpm.flush()
            self.tpm.run("tpm2_evictcontrol", "-C", "o", "-c", str(t / "ak.ctx"), f"0x{AK_HANDLE:08x}")
            self.tpm.extend(ev.LAUNCH_PCR, launch)
            self.statement = ev.VtpmStatement(
                ek=(t / "ek.pub").read_bytes(), ak=(t / "ak.pub").read_bytes(), pcr=ev.LAUNCH_PCR, launch=launch
            )
        self._provisioned.set()
        return self.statement

    def transmit(self, command: bytes) -> bytes:
        """One whole TPM command from the guest's device (vm_tpmdev) and the swtpm's whole response,
        between the launcher's own commands, and only once the launch PCR is extended: the guest's
        first command finds the launch measurement already there. OSError if the swtpm fails."""
        if not self._provisioned.wait(START_TIMEOUT):
            raise OSError("the vTPM was not provisioned")
        with self._lock, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            folder = os.open(self.folder, os.O_PATH | os.O_DIRECTORY)
            try:  # through the folder's descriptor: a run's folder can be deeper than a socket path may be long
                sock.settimeout(START_TIMEOUT)
                sock.connect(f"/proc/self/fd/{folder}/{SOCKET}")
            finally:
                os.close(folder)
            sock.sendall(command)
            head = _read(sock, RESPONSE_HEADER)
            size = int.from_bytes(head[2:6], "big")
            if not RESPONSE_HEADER <= size <= MAX_RESPONSE:
                raise OSError(f"the swtpm answered with a response of {size} bytes")
            return head + _read(sock, size - RESPONSE_HEADER)

    def quote(self, qualifying: bytes) -> tuple[bytes, bytes, dict[str, dict[int, bytes]]]:
        """(TPMS_ATTEST, TPMT_SIGNATURE, PCR values) of the launch PCR with ``qualifying`` data."""
        # one tpm2-tools run: the AK is persistent and a quote leaves no transient object to flush
        with self._lock, tempfile.TemporaryDirectory(dir=self.folder) as tmp:
            t = Path(tmp)
            self.tpm.quote_in(t, AK_HANDLE, [ev.LAUNCH_PCR], qualifying)
            return (t / "msg").read_bytes(), (t / "sig").read_bytes(), parse_pcr_file((t / "pcrs").read_bytes())

    def quoter(self, signer: ReportSigner) -> VtpmQuoter:
        if self.statement is None:
            raise CoveError("the vm's vTPM was not provisioned")
        return VtpmQuoter(self, self.statement, signer)

    def stop(self) -> None:
        """Stop the swtpm and remove its folder (state, socket, log)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


class VtpmQuoter:
    """Turns a report's bytes into the vTPM quote bound to it (ReportSigner.evidence's ``vtpm``), with the
    statement certified for the report's run (its instance_id): the launcher learns the run's id only
    from the reports it makes, and signing it costs far less than the quote."""

    def __init__(self, vtpm: Vtpm, statement: ev.VtpmStatement, signer: ReportSigner) -> None:
        self.vtpm = vtpm
        self.statement = statement
        self.signer = signer

    def __call__(self, report_bytes: bytes) -> ev.VtpmQuote:
        statement = dataclasses.replace(self.statement, instance_id=ev.parse_report(report_bytes).instance_id)
        statement_bytes, statement_signature = self.signer.certify_vtpm(statement)
        attest, signature, pcrs = self.vtpm.quote(ev.vm_quote_qualifier(report_bytes))
        return ev.VtpmQuote(
            statement=statement,
            statement_bytes=statement_bytes,
            statement_signature=statement_signature,
            attest=attest,
            signature=signature,
            pcrs=pcrs,
        )
