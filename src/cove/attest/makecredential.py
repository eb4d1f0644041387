"""TPM2_MakeCredential in software, for binding an attestation key to an endorsement key.

A certifier encrypts a secret to the EK so that only the TPM holding that EK,
with an object of the given Name loaded, can recover it (TPM2_ActivateCredential).
That is how an AK certificate authority learns the AK lives in the TPM
whose EK certificate it checked. The construction is the TPM 2.0 Library
spec's (Part 1, "Credential Protection"): an OAEP-encrypted seed, KDFa
(SP 800-108 counter-mode HMAC) for an AES-CFB key and an HMAC key, built
from ``cryptography`` primitives only. RSA endorsement keys are supported;
every TPM carries one with a certificate.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:  # CFB moved to "decrepit" in cryptography 43; the TPM spec still mandates it here
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB
from cryptography.hazmat.primitives.kdf.kbkdf import CounterLocation, KBKDFHMAC, Mode

from cove.attest._keys import HASHES
from cove.attest.errors import VerificationError

TOOLS_MAGIC = 0xBADCC0DE  # tpm2-tools' credential file header
TOOLS_VERSION = 1


def kdfa(hash_name: str, key: bytes, label: bytes, context: bytes, bits: int) -> bytes:
    """KDFa of the TPM spec: HMAC counter mode, [i]32 || label || 0 || context || [bits]32."""
    return KBKDFHMAC(
        algorithm=HASHES[hash_name](),
        mode=Mode.CounterMode,
        length=bits // 8,
        rlen=4,
        llen=4,
        location=CounterLocation.BeforeFixed,
        label=label,
        context=context,
        fixed=None,
    ).derive(key)


def make_credential(
    ek: rsa.RSAPublicKey, name: bytes, secret: bytes, *, name_alg: str = "sha256", symmetric_bits: int = 128
) -> tuple[bytes, bytes]:
    """(TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET) protecting ``secret`` for object ``name`` under ``ek``."""
    if not isinstance(ek, rsa.RSAPublicKey):
        raise VerificationError("tpm: credential activation needs an RSA endorsement key")
    if not 1 <= len(secret) <= hashlib.new(name_alg).digest_size:
        raise VerificationError("tpm: credential secret must be 1 to digest-size bytes")
    digest = HASHES[name_alg]()
    seed = os.urandom(digest.digest_size)
    encrypted_seed = ek.encrypt(
        seed, padding.OAEP(padding.MGF1(HASHES[name_alg]()), HASHES[name_alg](), b"IDENTITY\x00")
    )
    sym_key = kdfa(name_alg, seed, b"STORAGE", name, symmetric_bits)
    credential = struct.pack(">H", len(secret)) + secret
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(credential) + encryptor.finalize()
    hmac_key = kdfa(name_alg, seed, b"INTEGRITY", b"", digest.digest_size * 8)
    integrity = hmac.new(hmac_key, enc_identity + name, name_alg).digest()
    id_object = struct.pack(">H", len(integrity)) + integrity + enc_identity
    return (struct.pack(">H", len(id_object)) + id_object, struct.pack(">H", len(encrypted_seed)) + encrypted_seed)


def tools_credential_file(id_object: bytes, encrypted_secret: bytes) -> bytes:
    """The file tpm2_activatecredential -i reads: magic, version, then the two TPM2B structures."""
    return struct.pack(">II", TOOLS_MAGIC, TOOLS_VERSION) + id_object + encrypted_secret
