"""The master key and the encryption of everything secret at rest.

Every secret version and every broker key is stored as
``version byte || 12-byte nonce || AES-256-GCM(ciphertext || tag)`` under a
key derived from the master key with HKDF-SHA256, with the record's name
(path and version) as associated data, so a sealed value cannot be moved to
another record or version. The database alone reveals nothing.

The master key (32 bytes) comes from, in this order: ``--master-key-file``
(hex, base64 or 32 raw bytes), the environment variable
``COVE_KBS_MASTER_KEY`` (hex or base64), or a file sealed to this platform
(``--master-key-sealed``, through :mod:`cove.platform.sealing`). A key check
value stored in the database refuses a wrong master key at start with one
clear line.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import secrets as pysecrets
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cove.errors import CoveError
from cove.util import write_atomic

ENV_VAR = "COVE_KBS_MASTER_KEY"
FORMAT = 1
_CHECK_LABEL = b"cove-kbs key check"


class VaultError(CoveError):
    """The master key is missing or wrong, or a sealed record is damaged."""


def parse_key_text(data: bytes, where: str) -> bytes:
    """32 bytes from a key file or variable: 64 hex digits, base64 of 32 bytes, or 32 raw bytes."""
    text = data.strip()
    if len(data) == 32 and len(text) != 64:
        return bytes(data)
    try:
        if len(text) == 64:
            return binascii.unhexlify(text)
        decoded = base64.b64decode(text, validate=True)
        if len(decoded) == 32:
            return decoded
    except (binascii.Error, ValueError):
        pass
    raise VaultError(
        f"{where} does not hold a 32-byte key",
        "write 64 hex digits (e.g. `openssl rand -hex 32`) or use `cove kbs init`",
    )


def new_key_file(path: Path) -> bytes:
    """Create a master key file (hex, mode 0600); refuse to overwrite one."""
    if path.exists():
        raise VaultError(f"{path} already exists", "keep the key that encrypts your secrets; choose another path")
    key = pysecrets.token_bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, key.hex().encode() + b"\n", mode=0o600)
    return key


def load_master_key(
    key_file: Path | None = None, sealed_file: Path | None = None, environ: Mapping[str, str] | None = None
) -> bytes:
    """The master key from a key file, the environment, or a file sealed to this platform."""
    environ = os.environ if environ is None else environ
    if key_file is not None:
        try:
            data = Path(key_file).read_bytes()
        except FileNotFoundError:
            raise VaultError(f"master key file {key_file} not found", "create one with `cove kbs init`") from None
        except OSError as exc:
            raise VaultError(f"cannot read master key file {key_file}: {exc.strerror}") from None
        return parse_key_text(data, f"master key file {key_file}")
    if environ.get(ENV_VAR):
        return parse_key_text(environ[ENV_VAR].encode(), f"${ENV_VAR}")
    if sealed_file is not None:
        return _unseal_from_platform(Path(sealed_file))
    raise VaultError(
        "no master key given", f"pass --master-key-file FILE, set {ENV_VAR}, or pass --master-key-sealed FILE"
    )


def _platform_sealing() -> ModuleType:
    try:
        from cove.platform import sealing  # provided by the platform layer
    except ImportError:
        raise VaultError(
            "sealing to the platform is not available in this installation", "use --master-key-file or $" + ENV_VAR
        ) from None
    return sealing


def seal_to_platform(key: bytes, path: Path) -> None:
    """Write the master key sealed to this platform (only this host can unseal it)."""
    sealing = _platform_sealing()
    blob = sealing.seal(key, label="cove-kbs-master-key")
    write_atomic(path, blob, mode=0o600)


def _unseal_from_platform(path: Path) -> bytes:
    sealing = _platform_sealing()
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise VaultError(f"cannot read sealed master key {path}: {exc.strerror}") from None
    try:
        key: bytes = sealing.unseal(blob, label="cove-kbs-master-key")
    except CoveError as exc:
        raise VaultError(f"cannot unseal the master key {path}: {exc.message}") from None
    if len(key) != 32:
        raise VaultError(f"sealed master key {path} is not 32 bytes")
    return key


class Vault:
    """Seals and unseals records under keys derived from the master key."""

    def __init__(self, master_key: bytes):
        if len(master_key) != 32:
            raise VaultError("the master key must be 32 bytes")
        self._aead = AESGCM(self._derive(master_key, b"cove-kbs records v1"))
        self._check = self._derive(master_key, _CHECK_LABEL)

    @staticmethod
    def _derive(master: bytes, info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)

    def check_value(self) -> str:
        """A value that identifies the master key without revealing it (stored in the database)."""
        return hmac.new(self._check, _CHECK_LABEL, "sha256").hexdigest()

    def verify_check_value(self, stored: str) -> None:
        if not hmac.compare_digest(stored.encode(), self.check_value().encode()):
            raise VaultError(
                "the master key does not match the one this database was created with",
                "pass the original --master-key-file or $" + ENV_VAR,
            )

    def seal(self, name: str, plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        return bytes([FORMAT]) + nonce + self._aead.encrypt(nonce, plaintext, name.encode())

    def unseal(self, name: str, sealed: bytes) -> bytes:
        if len(sealed) < 1 + 12 + 16 or sealed[0] != FORMAT:
            raise VaultError(f"sealed record {name} is malformed")
        try:
            return self._aead.decrypt(sealed[1:13], sealed[13:], name.encode())
        except InvalidTag:
            raise VaultError(f"sealed record {name} failed authentication (damaged or moved)") from None
