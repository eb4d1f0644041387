"""The on-disk format of a volume: its root file, the key header and host file IDs.

Host layout::

    VOLUME/root             header (plain CBOR) + the encrypted index (AES-256-GCM)
    VOLUME/root.next        the next root, only during a commit
    VOLUME/files/xx/ID      one protected file per regular file (bound to ID)

Keys: the key source gives a 16-byte key-encryption key (KEK) that wraps a
random 32-byte volume master key (VMK) in the header. HKDF-SHA256 over the VMK
(salt: the volume id) gives the protected files' key, the index key, the key
that tags file IDs and the anchor's secret. Re-wrapping (a sealing key of a
higher svn) rewrites only the header.

Everything that fixes bytes on disk is here, apart from the commit protocol
that decides when they are written (:mod:`cove.fs.volume`), so the format can
be read (and checked against docs/formats/encrypted-files.md) in one place.
"""

from __future__ import annotations

import hmac
import os
import struct
from typing import Any

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cove.decode import Fields, decode_cbor
from cove.fs.errors import VolumeIntegrityError
from cove.fs.index import KeyFor, KeyPolicy

MAGIC = b"COVEVOL1"
FORMAT = 1
ROOT = "root"
NEXT = "root.next"
FILES = "files"
_LEN = struct.Struct("<I")
INDEX_LIMIT = 1 << 30  # the index of every path in a volume: authenticated, and it grows with the volume


def kdf(vmk: bytes, salt: bytes, purpose: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, salt, b"cove volume " + purpose).derive(vmk)


def _wrap_aad(volume_id: bytes, label: str, policy: KeyPolicy) -> bytes:
    return b"cove volume key\0" + volume_id + cbor2.dumps([label, policy.source, policy.svn])


def wrap_key(kek: bytes, vmk: bytes, volume_id: bytes, label: str, policy: KeyPolicy) -> bytes:
    """The header's ``wrapped`` field: the VMK sealed under the KEK, bound to the volume."""
    nonce = os.urandom(12)
    return nonce + AESGCM(kek).encrypt(nonce, vmk, _wrap_aad(volume_id, label, policy))


# -- the root file -------------------------------------------------------------------


def split_root(data: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    """(header, aad, sealed index) of a root file; raises VolumeIntegrityError."""
    if len(data) < len(MAGIC) + _LEN.size or not data.startswith(MAGIC):
        raise VolumeIntegrityError("not a Cove volume root (bad magic)")
    (size,) = _LEN.unpack_from(data, len(MAGIC))
    end = len(MAGIC) + _LEN.size + size
    if end + 12 + 16 > len(data):
        raise VolumeIntegrityError("volume root truncated")
    header = decode_cbor(data[len(MAGIC) + _LEN.size : end], _unreadable, "volume root header")
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise VolumeIntegrityError(
            f"unsupported volume format {header.get('format') if isinstance(header, dict) else '?'}"
        )
    return header, data[:end], data[end:]


def _unreadable(message: str) -> VolumeIntegrityError:
    return VolumeIntegrityError(f"volume root header is not readable: {message}")


def _incomplete(message: str) -> VolumeIntegrityError:
    return VolumeIntegrityError(f"volume root header is incomplete: {message}")


def decode_root(data: bytes, key_for: KeyFor | bytes) -> tuple[dict[str, Any], bytes, dict[str, Any]]:
    """(header, vmk, index body) of a root file's bytes."""
    header, aad, sealed = split_root(data)
    fields = Fields(header, "header", _incomplete)
    key = fields.sub("key")
    policy = KeyPolicy(key.text("source", max_len=4096), key.uint("svn"))
    wrapped, volume_id, label = fields.bytes("wrapped"), fields.bytes("id"), fields.text("label", max_len=4096)
    kek = key_for(policy) if callable(key_for) else key_for
    try:
        vmk = AESGCM(kek).decrypt(wrapped[:12], wrapped[12:], _wrap_aad(volume_id, label, policy))
    except (InvalidTag, ValueError):
        raise VolumeIntegrityError(
            "the key does not open this volume (wrong key, or its header was modified)", "check the key source"
        ) from None
    index = AESGCM(kdf(vmk, volume_id, b"index", 32))
    try:
        plain = index.decrypt(sealed[:12], sealed[12:], aad)
    except InvalidTag:
        raise VolumeIntegrityError(
            "volume root MAC mismatch (its index was modified)",
            "the volume was tampered with; restore it from a backup",
        ) from None
    body = decode_cbor(plain, VolumeIntegrityError, "volume index", limit=INDEX_LIMIT)
    if not isinstance(body, dict):
        raise VolumeIntegrityError("volume index must be a map")
    return header, vmk, body


def encode_root(header: dict[str, Any], body: dict[str, Any], index: AESGCM) -> bytes:
    """A root file's bytes: the header in the clear, the index body sealed under ``index``."""
    header_bytes = cbor2.dumps(header, canonical=True)
    aad = MAGIC + _LEN.pack(len(header_bytes)) + header_bytes
    nonce = os.urandom(12)
    return aad + nonce + index.encrypt(nonce, cbor2.dumps(body), aad)


# -- host file IDs: EPOCH-RAND-TAG, the tag an HMAC under the volume's name key -------------


def _tag(name_key: bytes, epoch: int, rand: bytes) -> bytes:
    return hmac.new(name_key, struct.pack("<Q", epoch) + rand, "sha256").digest()[:8]


def new_id(name_key: bytes, epoch: int) -> str:
    rand = os.urandom(8)
    return f"{epoch:x}-{rand.hex()}-{_tag(name_key, epoch, rand).hex()}"


def tag_ok(name_key: bytes, epoch: int, rand: bytes, tag: bytes) -> bool:
    return hmac.compare_digest(_tag(name_key, epoch, rand), tag)


def parse_id(name: str) -> tuple[int, bytes, bytes] | None:
    parts = name.split("-")
    if len(parts) != 3:
        return None
    try:
        return int(parts[0], 16), bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
    except ValueError:
        return None
