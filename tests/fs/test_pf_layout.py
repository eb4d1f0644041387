"""The on-disk layout, checked field by field against the format specification.

The checks decode a Cove-written file with an independent implementation of
the spec (plain CMAC for the KDF, offsets written out as numbers), so a
layout mistake in the library cannot cancel itself out.
"""

from __future__ import annotations

import os
import struct

from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.cmac import CMAC

from cove.fs import ProtectedFile
from cove.fs.crypto import derive_metadata_key

from pf_helpers import host, key  # noqa: F401 (fixtures)


def spec_kdf(kdk: bytes, nonce: bytes) -> bytes:
    """SP800-108 input as the format packs it: u32le counter, label[64], nonce, u32le bits."""
    msg = struct.pack("<I", 1) + b"SGX-PROTECTED-FS-METADATA-KEY".ljust(64, b"\0") + nonce + struct.pack("<I", 128)
    assert len(msg) == 104
    c = CMAC(algorithms.AES(kdk))
    c.update(msg)
    return c.finalize()


def test_kdf_matches_spec_encoding():
    for _ in range(20):
        kdk, nonce = os.urandom(16), os.urandom(32)
        assert derive_metadata_key(kdk, nonce) == spec_kdf(kdk, nonce)


def gcm_open(key: bytes, ct: bytes, tag: bytes) -> bytes:
    return AESGCM(key).decrypt(bytes(12), ct + tag, None)


def test_layout_field_by_field(host, key):
    content = os.urandom(3072 + 96 * 4096 + 10)  # reaches MHT node 1 and its first data node
    with ProtectedFile.open(host, key, "vol/some file", "w") as f:
        f.write(0, content)
        root_mac = f.root_mac()
    raw = open(host, "rb").read()
    assert len(raw) == 4096 * 100  # metadata, root MHT, 96 data, MHT 1, 1 data

    # plaintext header: bytes 0-58
    assert raw[0:8] == b"GRAFS_PF"
    assert struct.unpack_from("<Q", raw, 0)[0] == 0x46505F5346415247
    assert raw[8] == 2 and raw[9] == 0  # major, minor version
    nonce, mac, flags = raw[10:42], raw[42:58], raw[58]
    assert flags == 0 and mac == root_mac
    # encrypted header: bytes 59-3942; padding 3943-4095 is zeros
    assert raw[3943:4096] == bytes(153)
    md = gcm_open(spec_kdf(key, nonce), raw[59:3943], mac)
    assert len(md) == 3884
    assert md[0:772] == b"vol/some file".ljust(772, b"\0")  # file_path[260 + 512]
    assert struct.unpack_from("<Q", md, 772)[0] == len(content)  # file_size
    root_key, root_tag = md[780:796], md[796:812]
    assert md[812:3884] == content[:3072]  # first 3 KiB of content

    # root MHT node = physical node 1: 96 data (key, mac) pairs then 32 MHT pairs
    root = gcm_open(root_key, raw[4096:8192], root_tag)
    for d in (0, 1, 95):
        k, t = root[32 * d : 32 * d + 16], root[32 * d + 16 : 32 * d + 32]
        node = gcm_open(k, raw[4096 * (d + 2) : 4096 * (d + 3)], t)
        assert node == content[3072 + 4096 * d : 3072 + 4096 * (d + 1)]
    # MHT node 1 is physical node 98; its key and MAC are pair 96 of the root
    k, t = root[96 * 32 : 96 * 32 + 16], root[96 * 32 + 16 : 97 * 32]
    mht1 = gcm_open(k, raw[4096 * 98 : 4096 * 99], t)
    # data node 96 is physical node 99, slot 0 of MHT node 1; it is partial
    node = gcm_open(mht1[0:16], raw[4096 * 99 : 4096 * 100], mht1[16:32])
    tail = content[3072 + 96 * 4096 :]
    assert node[: len(tail)] == tail and node[len(tail) :] == bytes(4096 - len(tail))
