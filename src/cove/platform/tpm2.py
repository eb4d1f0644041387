"""The TPM operations the platform monitor needs, through tpm2-tools.

Each method is one TPM task (read the EK certificate, make an AK, activate a
credential, reset and extend a PCR, quote, seal and unseal). Files pass
through a private temporary folder. With no resource manager in between (a
swtpm socket), objects stay loaded after each tool exits and the TPM has
only a few slots, so transient objects are flushed before every step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from cove.errors import CoveError, SetupError

EK_CERT_RSA_NV = 0x01C00002
DEVICE = "/dev/tpmrm0"


class TpmError(CoveError):
    """A TPM command failed; the message carries the tool's last line."""


def device_tcti() -> str | None:
    """The TCTI of the host's TPM, if it has one."""
    return f"device:{DEVICE}" if os.path.exists(DEVICE) else None


class Tpm:
    """tpm2-tools bound to one TCTI."""

    def __init__(self, tcti: str):
        self.tcti = tcti
        if shutil.which("tpm2_quote") is None:
            raise SetupError("tpm2-tools is not installed", "run scripts/setup")

    def run(self, tool: str, *args: str, input: bytes | None = None) -> bytes:
        env = dict(os.environ, TPM2TOOLS_TCTI=self.tcti)
        try:
            proc = subprocess.run([tool, *args], input=input, capture_output=True, env=env, timeout=60)
        except FileNotFoundError:
            raise SetupError(f"{tool} is not installed", "run scripts/setup") from None
        except subprocess.TimeoutExpired:
            raise TpmError(f"{tool} timed out talking to the TPM at {self.tcti}") from None
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit code {proc.returncode}"
            if "Failed to initialize tcti" in proc.stderr.decode("utf-8", "replace") or "Connection refused" in last:
                raise TpmError(
                    f"the TPM at {self.tcti} is not reachable",
                    "start it with `cove platform init --swtpm`, or check the TPM device",
                )
            raise TpmError(f"{tool} failed: {last.strip()}")
        return proc.stdout

    def flush(self) -> None:
        self.run("tpm2_flushcontext", "-t")

    def reachable(self) -> bool:
        try:
            self.run("tpm2_getcap", "properties-fixed")
            return True
        except TpmError:
            return False

    def ek_certificate(self) -> bytes:
        """The RSA EK certificate (DER) from its standard NV index."""
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "ek.der"
            self.run("tpm2_nvread", f"0x{EK_CERT_RSA_NV:08x}", "-o", str(out))
            data = out.read_bytes()
        # Some TPMs pad the NV area; a DER SEQUENCE says its own length.
        if len(data) > 4 and data[0] == 0x30 and data[1] == 0x82:
            data = data[: 4 + int.from_bytes(data[2:4], "big")]
        return data

    def _ek(self, tmp: Path) -> tuple[Path, bytes]:
        ctx, pub = tmp / "ek.ctx", tmp / "ek.pub"
        self.flush()
        self.run("tpm2_createek", "-c", str(ctx), "-G", "rsa", "-u", str(pub))
        self.flush()
        return ctx, pub.read_bytes()

    def ek_public(self) -> bytes:
        """The RSA EK's TPM2B_PUBLIC (from the standard template)."""
        with tempfile.TemporaryDirectory() as tmp:
            return self._ek(Path(tmp))[1]

    def create_ak(self, handle: int) -> bytes:
        """A new ECDSA P-256 AK under the EK, made persistent at ``handle``; its TPM2B_PUBLIC."""
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            ek_ctx, _ = self._ek(t)
            self.evict(handle)
            self.create_ak_in(ek_ctx, t)
            self.flush()
            self.run("tpm2_evictcontrol", "-C", "o", "-c", str(t / "ak.ctx"), f"0x{handle:08x}")
            self.flush()
            return (t / "ak.pub").read_bytes()

    def create_ak_in(self, ek_ctx: Path, folder: Path, *, no_da: bool = False) -> None:
        """An ECDSA P-256 signing AK under the EK in ``ek_ctx``: ak.ctx, ak.pub, ak.name, ak.priv in ``folder``.

        ``no_da`` sets noDA: a dictionary-attack lockout that another user of the TPM triggers with its
        own keys then never stops the AK's quotes (the vm backend's vTPM, which its guest shares).
        tpm2_createak sets no attributes, so that AK is TPM2_Create and TPM2_Load under the EK, each
        authorized by the EK's policy (PolicySecret of the endorsement hierarchy); same template otherwise."""
        if not no_da:
            self.run(
                "tpm2_createak",
                *("-C", str(ek_ctx), "-c", str(folder / "ak.ctx"), "-G", "ecc", "-g", "sha256", "-s", "ecdsa"),
                *("-u", str(folder / "ak.pub"), "-n", str(folder / "ak.name"), "-r", str(folder / "ak.priv")),
            )
            return
        attributes = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign|noda"
        keys = ("-u", str(folder / "ak.pub"), "-r", str(folder / "ak.priv"))
        for tool, *args in (
            ("tpm2_create", "-G", "ecc256:ecdsa-sha256:null", "-g", "sha256", "-a", attributes, *keys),
            ("tpm2_load", *keys, "-c", str(folder / "ak.ctx"), "-n", str(folder / "ak.name")),
        ):
            session = folder / "session.ctx"
            self.flush()  # the EK's context file is loaded again for each: room for it and the AK
            self.run("tpm2_startauthsession", "--policy-session", "-S", str(session))
            try:
                self.run("tpm2_policysecret", "-S", str(session), "-c", "e")
                self.run(tool, "-C", str(ek_ctx), "-P", f"session:{session}", *args)
            finally:
                self.run("tpm2_flushcontext", str(session))

    def evict(self, handle: int) -> None:
        """Remove a persistent object if there is one."""
        listing = self.run("tpm2_getcap", "handles-persistent").decode()
        if f"0x{handle:08x}" in listing.lower() or f"0x{handle:08X}" in listing:
            self.flush()
            self.run("tpm2_evictcontrol", "-C", "o", "-c", f"0x{handle:08x}")

    def read_public(self, handle: int) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "pub"
            self.flush()
            self.run("tpm2_readpublic", "-c", f"0x{handle:08x}", "-f", "tss", "-o", str(out))
            self.flush()
            return out.read_bytes()

    def activate_credential(self, ak_handle: int, credential: bytes) -> bytes:
        """TPM2_ActivateCredential with the EK (authorized by a PolicySecret session)."""
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            ek_ctx, _ = self._ek(t)
            (t / "cred").write_bytes(credential)
            self.run("tpm2_flushcontext", "-s")
            self.run("tpm2_startauthsession", "--policy-session", "-S", str(t / "s.ctx"))
            try:
                self.run("tpm2_policysecret", "-S", str(t / "s.ctx"), "-c", "e")
                self.run(
                    "tpm2_activatecredential",
                    "-c",
                    f"0x{ak_handle:08x}",
                    "-C",
                    str(ek_ctx),
                    "-i",
                    str(t / "cred"),
                    "-o",
                    str(t / "secret"),
                    "-P",
                    f"session:{t / 's.ctx'}",
                )
            finally:
                self.run("tpm2_flushcontext", "-s")
                self.flush()
            return (t / "secret").read_bytes()

    def reset_and_extend(self, pcr: int, digests: list[bytes]) -> None:
        self.run("tpm2_pcrreset", str(pcr))
        for digest in digests:
            self.run("tpm2_pcrextend", f"{pcr}:sha256={digest.hex()}")

    def extend(self, pcr: int, digest: bytes) -> None:
        self.run("tpm2_pcrextend", f"{pcr}:sha256={digest.hex()}")

    def read_pcr(self, pcr: int) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "pcr"
            self.run("tpm2_pcrread", f"sha256:{pcr}", "-o", str(out))
            return out.read_bytes()[:32]

    def quote_in(self, folder: Path, ak_handle: int, pcrs: list[int], qualifying: bytes) -> None:
        """One tpm2_quote by the AK at ``ak_handle`` over sha256:``pcrs``: msg, sig and pcrs in ``folder``."""
        self.run(
            "tpm2_quote",
            *("-c", f"0x{ak_handle:08x}", "-l", "sha256:" + ",".join(map(str, pcrs)), "-q", qualifying.hex()),
            *("-m", str(folder / "msg"), "-s", str(folder / "sig"), "-o", str(folder / "pcrs"), "-g", "sha256"),
        )

    def quote(self, ak_handle: int, pcrs: list[int], qualifying: bytes) -> tuple[bytes, bytes, bytes]:
        """(TPMS_ATTEST, TPMT_SIGNATURE, tpm2-tools PCR file) over sha256:``pcrs``."""
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            self.flush()
            self.quote_in(t, ak_handle, pcrs, qualifying)
            self.flush()
            return (t / "msg").read_bytes(), (t / "sig").read_bytes(), (t / "pcrs").read_bytes()

    def _primary(self, t: Path) -> Path:
        ctx = t / "primary.ctx"
        self.flush()
        self.run("tpm2_createprimary", "-C", "o", "-G", "ecc256", "-c", str(ctx))
        self.flush()
        return ctx

    def seal(self, secret: bytes) -> tuple[bytes, bytes]:
        """Seal ``secret`` under the owner hierarchy's primary key: (public, private) blobs."""
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            primary = self._primary(t)
            self.run(
                "tpm2_create", "-C", str(primary), "-u", str(t / "pub"), "-r", str(t / "priv"), "-i", "-", input=secret
            )
            self.flush()
            return (t / "pub").read_bytes(), (t / "priv").read_bytes()

    def unseal(self, public: bytes, private: bytes) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            (t / "pub").write_bytes(public)
            (t / "priv").write_bytes(private)
            primary = self._primary(t)
            self.run(
                "tpm2_load", "-C", str(primary), "-u", str(t / "pub"), "-r", str(t / "priv"), "-c", str(t / "obj.ctx")
            )
            self.flush()
            try:
                return self.run("tpm2_unseal", "-c", str(t / "obj.ctx"))
            finally:
                self.flush()
