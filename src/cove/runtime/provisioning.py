"""Provisioning secrets before the program starts (Occlum's init-RA, done by the runtime).

When cove.toml has ``[attestation]``, the runtime, before the program runs,
asks the platform for evidence about this enclave (its verified identity,
backend and isolation, never anything the enclave says) bound to the key
broker's challenge and a fresh TEE key, attests to the broker, and fetches
every ``[[secrets]]`` resource and every ``kbs:`` key of an encrypted mount:

- ``file:/path`` → a read-only file at /path, on a tmpfs mount of the
  enclave (on the host it lives only in the run's private folder, in memory
  when /dev/shm is there, and is removed when the enclave ends);
- ``env:NAME`` → the variable NAME in the program's environment (UTF-8);
- ``mount:/target`` and ``kbs:`` mount keys → the key of that encrypted
  mount, handed to the secure file system through the ``kbs`` key resolver.

If anything fails (the broker is unreachable, refuses, or a value does not
fit its target), the program does not start and the one line says why.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from pathlib import Path

from cove.errors import CoveError
from cove.runtime.enclave_services import Bind, EnclaveService, ServiceContext

VOLUME_KEY_SIZE = 16
_ACTIVE: dict[bytes, ProvisioningService] = {}
_LOCK = threading.Lock()


class ProvisioningError(CoveError):
    """Secrets could not be provisioned; the enclave does not start."""

    exit_code = 6


class PlatformEvidence:
    """Cove evidence for this enclave from the platform monitor (the runtime's side of /dev/attestation)."""

    tee = "cove"

    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx

    def evidence(self, report_data: bytes) -> dict:
        from cove.platform import monitor
        from cove.platform.reports import EnclaveClaims

        identity = self.ctx.identity
        claims = EnclaveClaims(
            identity.measurement,
            identity.signer,
            identity.product_id,
            identity.svn,
            identity.debug,
            self.ctx.backend,
            self.ctx.isolation,
            self.ctx.instance_id,
        )
        raw = monitor.signer().evidence(claims, report_data, self.ctx.vtpm_quote)
        return {"evidence": base64.b64encode(raw).decode()}


def volume_key(value: bytes, resource: str) -> bytes:
    """A secure-FS volume key from a released value: 16 bytes as is, 32 bytes (aes-256) through HKDF."""
    if len(value) == VOLUME_KEY_SIZE:
        return value
    if len(value) == 32:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        return HKDF(hashes.SHA256(), VOLUME_KEY_SIZE, None, b"cove kbs volume key v1").derive(value)
    raise ProvisioningError(
        f"kbs:{resource} released {len(value)} bytes; a volume key is 16 or 32 bytes",
        "store it as an aes-256 secret (cove kbs admin secret create --generate aes-256)",
    )


class ProvisioningService(EnclaveService):
    """Attest once, fetch every resource the configuration names, install them."""

    def __init__(self, ctx: ServiceContext, provider=None):
        self.ctx = ctx
        self.provider = provider or PlatformEvidence(ctx)
        self.values: dict[str, bytes] | None = None
        self.env: dict[str, str] = {}
        self.files: list[Path] = []
        self._fetch_lock = threading.Lock()
        keys = [m.key for m in ctx.config.mounts if m.key] + [ctx.image_key or ""]
        self.resources = sorted(
            {s.resource for s in ctx.config.secrets} | {key[4:] for key in keys if key.startswith("kbs:")}
        )
        with _LOCK:
            _ACTIVE[ctx.identity.measurement] = self

    def fetch(self) -> dict[str, bytes]:
        """Attest and fetch (once per run); a ProvisioningError says which step failed."""
        from cove.kbs.client import KbsError, fetch

        with self._fetch_lock:
            if self.values is None:
                attestation = self.ctx.config.attestation
                assert attestation is not None  # services() makes this service only with [attestation]
                try:
                    self.values = fetch(
                        attestation.kbs,
                        self.resources,
                        self.provider,
                        ca_cert=attestation.ca,
                        retries=attestation.retries,
                        timeout=attestation.timeout,
                        broker_policy=attestation.kbs_policy,
                    )
                except KbsError as exc:
                    error = ProvisioningError(
                        f"provisioning secrets from {attestation.kbs} failed: {exc.message}",
                        exc.hint or "the program was not started",
                    )
                    error.exit_code = exc.exit_code  # unreachable (7) is not refused (6): docs/cli.md
                    raise error from None
                except CoveError as exc:
                    raise ProvisioningError(
                        f"provisioning secrets failed: {exc.line()}", "the program was not started"
                    ) from None
            return self.values

    def start(self, ctx: ServiceContext) -> list[Bind]:
        values = self.fetch()
        binds: list[Bind] = []
        folder = ctx.workdir / "secrets"
        for secret in ctx.config.secrets:
            value = values[secret.resource]
            if secret.kind == "env":
                try:
                    text = value.decode("utf-8")
                except UnicodeDecodeError:
                    raise ProvisioningError(
                        f"secret {secret.name} ({secret.resource}) is not UTF-8 text, "
                        f"so it cannot be env:{secret.where}",
                        "use a file: target for binary secrets",
                    ) from None
                if "\0" in text:
                    raise ProvisioningError(
                        f"secret {secret.name} holds a NUL byte; it cannot be an environment variable",
                        "use a file: target",
                    )
                self.env[secret.where] = text
            elif secret.kind == "file":
                folder.mkdir(mode=0o700, exist_ok=True)
                host = folder / hashlib.sha256(secret.name.encode()).hexdigest()[:16]
                fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
                try:
                    os.write(fd, value)
                finally:
                    os.close(fd)
                self.files.append(host)
                binds.append(Bind(host, secret.where, writable=False))
            # mount: targets are served to the secure file system by resolve_kbs_key
        return binds

    def environment(self) -> dict[str, str]:
        return dict(self.env)

    def stop(self) -> None:
        for path in self.files:
            try:
                size = path.stat().st_size
                with open(path, "r+b") as handle:  # not in swap or a later file: overwrite, then remove
                    handle.write(bytes(size))
                path.unlink()
            except OSError:
                pass
        self.files.clear()
        self.values = None
        self.env.clear()
        with _LOCK:
            if _ACTIVE.get(self.ctx.identity.measurement) is self:
                del _ACTIVE[self.ctx.identity.measurement]


def resolve_kbs_key(source, identity, svn) -> bytes:
    """The ``kbs:`` key resolver of the secure file system: the released value, as a volume key."""
    with _LOCK:
        service = _ACTIVE.get(bytes(identity.measurement)) if identity is not None else None
    if service is None:
        raise ProvisioningError(
            f"{source.text}: the key broker is only asked when the enclave starts",
            "add [attestation] with the broker's URL to cove.toml and run the enclave",
        )
    values = service.fetch()
    if source.arg not in values:
        raise ProvisioningError(f"{source.text} was not fetched from the key broker")
    return volume_key(values[source.arg], source.arg)


def services(ctx: ServiceContext) -> list[EnclaveService]:
    """The factory the launcher calls: a provisioning service when [attestation] is configured."""
    if ctx.config.attestation is None:
        return []
    from cove.fs import keys

    keys.register_resolver("kbs", resolve_kbs_key)
    return [ProvisioningService(ctx)]
