"""RA-TLS for the broker: a broker in an enclave is trusted for its evidence, not for a CA's word.

Server side (``cove kbs serve --ra-tls``): a fresh TLS key, never written
outside the enclave's private memory, and an RA-TLS certificate
(:mod:`cove.attest.ratls`) whose evidence, read from ``/dev/attestation``,
binds that key. Client side (``KbsClient(broker_policy=...)``, ``cove kbs
get --kbs-policy``, ``[attestation] kbs_policy``): the broker's certificate
must carry evidence a policy accepts, checked before any request is sent.
"""

from __future__ import annotations

import os
import shutil
import ssl
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cove.attest import policy as attest_policy
from cove.attest import ratls
from cove.errors import CoveError

DEV_ATTESTATION = Path("/dev/attestation")


def evidence_source(root: Path = DEV_ATTESTATION) -> Callable[[bytes], bytes]:
    """Evidence from the enclave's /dev/attestation for the report data RA-TLS binds."""

    def get(report_data: bytes) -> bytes:
        try:
            (root / "user_report_data").write_bytes(report_data)
            return (root / "quote").read_bytes()
        except OSError as exc:
            raise CoveError(
                f"--ra-tls: cannot get evidence from {root}: {exc.strerror}",
                "run the broker inside a Cove enclave (cove run), or serve with --cert/--key",
            ) from None

    return get


@contextmanager
def certificate_files(root: Path = DEV_ATTESTATION, days: int = 30) -> Iterator[tuple[Path, Path]]:
    """(certificate, key) files for uvicorn, in a private folder removed when serving ends.

    The folder is on /dev/shm when there is one (memory, private to the
    enclave's mount namespace), so the key reaches no disk.
    """
    cert_pem, key_pem = ratls.make_certificate(
        evidence_source(root), common_name="Cove KBS (RA-TLS)", days=days, hostnames=("localhost",)
    )
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    folder = Path(tempfile.mkdtemp(prefix="cove-kbs-ratls-", dir=base))
    try:
        cert, key = folder / "tls.crt", folder / "tls.key"
        cert.write_bytes(cert_pem)
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            handle.write(key_pem)
        yield cert, key
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def load_policy(value: attest_policy.Policy | Path | str) -> attest_policy.Policy:
    """A broker policy from a Policy, a path, or inline TOML/JSON text; one clear error otherwise."""
    if isinstance(value, attest_policy.Policy):
        return value
    if isinstance(value, Path) or not attest_policy.is_inline(str(value)):
        return attest_policy.load_policy(value)
    return attest_policy.parse_policy(str(value), source="broker policy")


def client_context(policy: attest_policy.Policy | Path | str) -> ssl.SSLContext:
    """An ssl context that accepts only a broker whose RA-TLS evidence ``policy`` accepts."""
    return ratls.client_context(load_policy(policy))


def rejection(exc: BaseException) -> str | None:
    """The RA-TLS refusal behind a transport error (httpx wraps it), as one line; None if it is not one."""
    seen = 0
    cause: BaseException | None = exc
    while cause is not None and seen < 10:
        if isinstance(cause, ratls.RaTlsError):
            return cause.line()
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return None
