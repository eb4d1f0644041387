"""Key sources: where the 16-byte key of an encrypted file or volume comes from.

==================  =====================================================
``seal:mrenclave``  derived from the platform root secret and the enclave's
                    measurement (only this exact enclave on this platform)
``seal:mrsigner``   derived from the root secret, the signer and the product
                    id (survives rebuilds signed by the same key)
``file:PATH``       a key file on the host (16 raw bytes or 32 hex digits);
                    for development: the host can read it
``insecure:HEX``    the key written in cove.toml (32 hex digits); debug
                    enclaves only, refused at build otherwise
``kbs:RESOURCE``    released by the key broker after attestation; resolved
                    by a function the key broker registers
==================  =====================================================

Sealing keys are svn-aware (:mod:`cove.platform.sealing`): :func:`resolve`
takes the svn the data was sealed at.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

# The key-source syntax is cove.toml data, so it lives in config; re-exported here for the key's users.
from cove.config import KEY_SOURCE_KINDS, SEAL_POLICIES as SEAL_POLICIES
from cove.config import KeySource as KeySource
from cove.config import KeySourceError as KeySourceError
from cove.config import parse_key_source

if TYPE_CHECKING:
    from cove.platform.sealing import Identity

parse = parse_key_source  # the name the rest of fs (and its callers) use

KEY_SIZE = 16
KINDS = KEY_SOURCE_KINDS
_HEX_RE = re.compile(r"^[0-9a-fA-F]{32}$")


KEY_FILE_MAX = 64  # 32 hex digits with room for surrounding whitespace; more is not a key file, and is not read


def read_key_file(path: str | Path) -> bytes:
    """A key file: 16 raw bytes, or 32 hex digits with optional surrounding whitespace.

    Callers run as root for others (a container's image names the path), so the
    file is opened without blocking or becoming a terminal, must be a regular
    file, and at most KEY_FILE_MAX + 1 bytes are read; the refusal names no size.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeySourceError(f"key file {path} not found", "create one with: head -c16 /dev/urandom > FILE") from None
    except OSError as exc:
        raise KeySourceError(f"cannot read key file {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise KeySourceError(f"key file {path} is not a regular file")
        try:
            data = os.read(fd, KEY_FILE_MAX + 1)
        except OSError as exc:
            raise KeySourceError(f"cannot read key file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) == KEY_SIZE:
        return data
    text = data.strip()
    if len(data) <= KEY_FILE_MAX and _HEX_RE.match(text.decode("ascii", "replace")):
        return bytes.fromhex(text.decode())
    raise KeySourceError(f"key file {path} holds no key", "a key file holds 16 raw bytes or 32 hex digits")


# kind -> function(source, identity, svn) -> 16-byte key; the key broker adds "kbs".
Resolver = Callable[[KeySource, "Identity | None", "int | None"], bytes]
_RESOLVERS: dict[str, Resolver] = {}


def register_resolver(kind: str, resolver: Resolver | None) -> Resolver | None:
    """Let another part of Cove resolve a kind of key source (the key broker: "kbs"); None takes it away.

    ``resolver(source, identity, svn)`` returns the 16-byte key or raises CoveError. Returns the resolver
    it replaced (None if there was none), so that whoever registers for a while can put it back.
    """
    before = _RESOLVERS.pop(kind, None)
    if resolver is not None:
        _RESOLVERS[kind] = resolver
    return before


def resolve(source: KeySource | str, identity: Identity | None = None, svn: int | None = None) -> bytes:
    """The key a source names, for an enclave ``identity`` (needed for seal: and kbs:).

    ``svn`` is the svn the data was sealed at (default: the enclave's own);
    an enclave cannot derive the key of a higher svn than its own.
    """
    if isinstance(source, str):
        source = parse(source)
    if source.kind in _RESOLVERS:
        key = _RESOLVERS[source.kind](source, identity, svn)
    elif source.kind == "seal":
        if identity is None:
            raise KeySourceError(
                f"{source.text} needs the identity of a built enclave",
                "run from the instance folder, or pass -C INSTANCE",
            )
        from cove.platform import sealing

        try:
            key = sealing.sealing_key(identity, source.arg, svn)
        except sealing.SealingError as exc:
            raise KeySourceError(exc.message, exc.hint) from None
    elif source.kind == "file":
        key = read_key_file(source.arg)
    elif source.kind == "insecure":
        key = bytes.fromhex(source.arg)
    else:
        raise KeySourceError(
            f"{source.kind}: keys need the key broker client, which is not installed",
            "use seal:, file: or insecure: keys until the key broker is set up",
        )
    if len(key) != KEY_SIZE:
        raise KeySourceError(f"{source} gave a {len(key)}-byte key; volumes need {KEY_SIZE} bytes")
    return bytes(key)
