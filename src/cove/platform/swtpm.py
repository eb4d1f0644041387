"""A software TPM for development and tests: set up with an EK certificate, run as a socket TPM.

``swtpm_setup`` manufactures the TPM state (EK, EK certificate signed by a
local CA that ``swtpm_localca`` creates in the platform folder, platform
certificate); ``swtpm socket`` serves it on loopback. The local CA stands in
for a TPM vendor's CA: its root is what a verifier's policy must trust.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cove.errors import CoveError, SetupError
from cove.util import write_atomic


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin:/bin")
    if path is None:
        raise SetupError(f"{name} is not installed (swtpm, swtpm-tools)", "run scripts/setup")
    return path


def _free_port_pair() -> int:
    """A port P with P+1 free too: the swtpm TCTI expects the control channel on P+1."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise CoveError("no free pair of loopback ports for the swtpm")


class SwTpm:
    """One swtpm instance kept in ``directory`` (state, local CA, pid and port files)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.state = self.dir / "state"
        self.ca = self.dir / "ca"
        self.pid_file = self.dir / "swtpm.pid"
        self.port_file = self.dir / "port"
        self.log = self.dir / "swtpm.log"

    @property
    def manufactured(self) -> bool:
        return (self.state / "tpm2-00.permall").exists()

    def setup(self) -> None:
        """Manufacture the TPM (EK + certificate from the local CA) unless already done."""
        if self.manufactured:
            return
        for d in (self.state, self.ca):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        localca = self.dir / "swtpm-localca.conf"
        write_atomic(
            localca,
            (
                f"statedir = {self.ca}\nsigningkey = {self.ca}/signkey.pem\n"
                f"issuercert = {self.ca}/issuercert.pem\ncertserial = {self.ca}/certserial\n"
            ).encode(),
        )
        options = self.dir / "swtpm-localca.options"
        write_atomic(options, b"--platform-manufacturer Cove\n--platform-version 1.0\n--platform-model swtpm\n")
        setup_conf = self.dir / "swtpm_setup.conf"
        write_atomic(
            setup_conf,
            (
                f"create_certs_tool = {_tool('swtpm_localca')}\n"
                f"create_certs_tool_config = {localca}\n"
                f"create_certs_tool_options = {options}\nactive_pcr_banks = sha256\n"
            ).encode(),
        )
        proc = subprocess.run(
            [
                _tool("swtpm_setup"),
                "--tpm2",
                "--tpm-state",
                str(self.state),
                "--create-ek-cert",
                "--create-platform-cert",
                "--config",
                str(setup_conf),
                "--overwrite",
                "--pcr-banks",
                "sha256",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0 or not self.manufactured:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise CoveError(f"swtpm_setup failed: {last}")

    def ek_roots_pem(self) -> bytes:
        """The local CA's root certificate: what a policy's ek_ca must name for this swtpm."""
        return (self.ca / "swtpm-localca-rootca-cert.pem").read_bytes()

    def ek_intermediates(self) -> list[bytes]:
        """DER certificates between the EK certificate and the root, root last."""
        out = []
        for name in ("issuercert.pem", "swtpm-localca-rootca-cert.pem"):
            cert = x509.load_pem_x509_certificate((self.ca / name).read_bytes())
            out.append(cert.public_bytes(serialization.Encoding.DER))
        return out

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if b"swtpm" in cmdline and str(self.state).encode() in cmdline else None

    def port(self) -> int | None:
        try:
            return int(self.port_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port()}"

    def start(self) -> str:
        """Run the swtpm (if it is not running yet); its TCTI."""
        if self.pid() is not None and self.port():
            return self.tcti()
        port = _free_port_pair()
        ctrl = port + 1
        proc = subprocess.run(
            [
                _tool("swtpm"),
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={self.state}",
                "--server",
                f"type=tcp,port={port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
                "--flags",
                "startup-clear",
                "--daemon",
                "--pid",
                f"file={self.pid_file}",
                "--log",
                f"file={self.log}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise CoveError(f"swtpm failed to start: {(proc.stderr.strip().splitlines() or ['no message'])[-1]}")
        write_atomic(self.port_file, f"{port}\n".encode())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return self.tcti()
            time.sleep(0.02)
        raise CoveError(f"swtpm did not listen on port {port}", f"see {self.log}")

    def stop(self) -> bool:
        """Stop the swtpm; whether one was running."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            try:
                if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.02)
        else:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True
