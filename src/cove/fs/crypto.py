"""The crypto of the format: key derivation and node sealing.

Only ``cryptography`` primitives are used. Each node is sealed with AES-128-GCM
under its own fresh random key, an all-zero IV and no AAD; the 16-byte GCM tag
is the node's MAC and is stored, with the key, in the parent node.
"""

from __future__ import annotations

import hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.kbkdf import CounterLocation, KBKDFCMAC, Mode

from cove.fs.layout import IV, KDF_LABEL, KDF_LABEL_FIELD, KEY_SIZE, MAC_SIZE, NODE_SIZE

# What the node sealing reads and writes: a node buffer, or a view into a run of them.
Buffer = bytes | bytearray | memoryview

__all__ = [
    "AESGCM",
    "Buffer",
    "FAST",
    "IV",
    "InvalidTag",
    "derive_metadata_key",
    "random_keys",
    "seal",
    "open_sealed",
    "macs_equal",
]


def derive_metadata_key(kdk: bytes, nonce: bytes) -> bytes:
    """NIST SP800-108 counter-mode KDF with AES-CMAC as PRF, one 128-bit block.

    The format feeds CMAC with ``u32le(1) || label[64] || nonce[32] || u32le(128)``.
    SP800-108 leaves the encoding open; ``KBKDFCMAC`` writes the counter
    big-endian, so we give it a one-byte counter (0x01) and put the three
    remaining zero bytes of the little-endian counter at the start of the fixed
    input. The PRF input is then byte-identical to the format's.
    """
    if len(kdk) != KEY_SIZE:
        raise ValueError("the key-derivation key must be 16 bytes")
    fixed = b"\0\0\0" + KDF_LABEL.ljust(KDF_LABEL_FIELD, b"\0") + nonce + struct.pack("<I", KEY_SIZE * 8)
    kdf = KBKDFCMAC(algorithms.AES, Mode.CounterMode, KEY_SIZE, 1, None, CounterLocation.BeforeFixed, None, None, fixed)
    return kdf.derive(kdk)


def random_keys(n: int) -> bytes:
    """``n`` fresh node keys in one CSPRNG call (cheaper than n calls)."""
    return os.urandom(KEY_SIZE * n)


FAST = hasattr(AESGCM, "encrypt_into")  # hot loops may call AESGCM(key).encrypt_into/decrypt_into


if FAST:  # cryptography >= 45: no intermediate copies

    def seal(key: Buffer, plain: Buffer, out: bytearray | memoryview) -> None:
        """Encrypt ``plain`` into ``out`` (len(plain) + 16 bytes: ciphertext || tag)."""
        AESGCM(key).encrypt_into(IV, plain, None, out)

    def open_sealed(key: Buffer, sealed: Buffer, out: bytearray | memoryview) -> None:
        """Decrypt ``sealed`` (ciphertext || tag) into ``out``; raises InvalidTag."""
        AESGCM(key).decrypt_into(IV, sealed, None, out)

else:  # older cryptography: same result, one extra copy

    def seal(key: Buffer, plain: Buffer, out: bytearray | memoryview) -> None:
        """Encrypt ``plain`` into ``out`` (len(plain) + 16 bytes: ciphertext || tag)."""
        out[:] = AESGCM(key).encrypt(IV, bytes(plain), None)

    def open_sealed(key: Buffer, sealed: Buffer, out: bytearray | memoryview) -> None:
        """Decrypt ``sealed`` (ciphertext || tag) into ``out``; raises InvalidTag."""
        out[:] = AESGCM(key).decrypt(IV, bytes(sealed), None)


def macs_equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison of MACs, keys and other secrets."""
    return hmac.compare_digest(a, b)


assert MAC_SIZE == 16 and NODE_SIZE == 4096
