"""On-disk layout of a protected file (Gramine protected-file format v2).

Pure arithmetic and struct packing, no I/O and no crypto, so that the
format can be checked field by field against the specification.

Physical nodes (4096 bytes each)::

    0            metadata node
    1            root MHT node (MHT 0)
    2..97        data nodes 0..95 (attached to MHT 0)
    98           MHT node 1
    99..194      data nodes 96..191
    ...

The first 3072 bytes of file content live inside the metadata node.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

NODE_SIZE = 4096
KEY_SIZE = 16
MAC_SIZE = 16
NONCE_SIZE = 32
IV = bytes(12)  # all-zero IV: every node key is fresh and used once

MAGIC = b"GRAFS_PF"  # little-endian u64 0x46505f5346415247
MAJOR_VERSION = 2
MINOR_VERSION = 0
HAS_PENDING_WRITE = 0x01
KNOWN_FLAGS = HAS_PENDING_WRITE

PATH_MAX_SIZE = 260 + 512  # bytes, including the terminating NUL
MD_USER_DATA_SIZE = NODE_SIZE * 3 // 4  # 3072 bytes of content in the metadata node
ATTACHED_DATA_NODES = 96  # key+MAC slots for data nodes per MHT node
CHILD_MHT_NODES = 32  # key+MAC slots for child MHT nodes per MHT node
PAIR_SIZE = KEY_SIZE + MAC_SIZE

# plaintext header: magic u64, major u8, minor u8, nonce[32], mac[16], flags u8
HEADER = struct.Struct("<8sBB32s16sB")
HEADER_V1 = struct.Struct("<8sBB32s16s")  # version 1 had no feature-flags byte
# encrypted part: path[772], size u64, root key[16], root mac[16], data[3072]
ENC_HEAD = struct.Struct(f"<{PATH_MAX_SIZE}sQ16s16s")
ENC_SIZE = ENC_HEAD.size + MD_USER_DATA_SIZE
ENC_OFFSET = HEADER.size
PAD_OFFSET = ENC_OFFSET + ENC_SIZE
assert HEADER.size == 59 and ENC_SIZE == 3884 and PAD_OFFSET == 3943

KDF_LABEL = b"SGX-PROTECTED-FS-METADATA-KEY"
KDF_LABEL_FIELD = 64  # label is NUL-padded to 64 bytes in the KDF input


@dataclass
class Header:
    """The plaintext part of the metadata node (not confidential, not MACed)."""

    magic: bytes
    major: int
    minor: int
    nonce: bytes
    mac: bytes
    flags: int

    def pack(self) -> bytes:
        return HEADER.pack(self.magic, self.major, self.minor, self.nonce, self.mac, self.flags)


@dataclass
class MetaPlain:
    """The decrypted part of the metadata node."""

    path: bytes  # without the NUL terminator
    size: int
    root_key: bytes
    root_mac: bytes
    data: bytearray  # MD_USER_DATA_SIZE bytes

    def pack(self) -> bytes:
        path = self.path.ljust(PATH_MAX_SIZE, b"\0")
        return ENC_HEAD.pack(path, self.size, self.root_key, self.root_mac) + bytes(self.data)


def unpack_meta_plain(blob: bytes | bytearray) -> MetaPlain:
    path, size, root_key, root_mac = ENC_HEAD.unpack_from(blob)
    nul = path.find(b"\0")
    return MetaPlain(path[: nul if nul >= 0 else len(path)], size, root_key, root_mac, bytearray(blob[ENC_HEAD.size :]))


def data_node_of(offset: int) -> int:
    """Logical data node number holding file offset ``offset`` (>= 3072)."""
    return (offset - MD_USER_DATA_SIZE) // NODE_SIZE


def data_node_start(d: int) -> int:
    """File offset of the first byte of logical data node ``d``."""
    return MD_USER_DATA_SIZE + d * NODE_SIZE


def data_phys(d: int) -> int:
    """Physical node number of logical data node ``d``."""
    return d + 2 + d // ATTACHED_DATA_NODES


def mht_phys(m: int) -> int:
    """Physical node number of logical MHT node ``m`` (0 is the root)."""
    return 1 + m * (1 + ATTACHED_DATA_NODES)


def mht_of_data(d: int) -> int:
    """The MHT node holding the key and MAC of data node ``d``."""
    return d // ATTACHED_DATA_NODES


def mht_parent(m: int) -> int:
    """The MHT node holding the key and MAC of MHT node ``m`` (m >= 1)."""
    return (m - 1) // CHILD_MHT_NODES


def data_slot(d: int) -> int:
    """Byte offset of data node ``d``'s key+MAC pair inside its MHT node."""
    return (d % ATTACHED_DATA_NODES) * PAIR_SIZE


def mht_slot(m: int) -> int:
    """Byte offset of MHT node ``m``'s key+MAC pair inside its parent."""
    return (ATTACHED_DATA_NODES + (m - 1) % CHILD_MHT_NODES) * PAIR_SIZE


def mht_exists(m: int, size: int) -> bool:
    """An MHT node exists once the first data node attached to it does."""
    return data_node_start(m * ATTACHED_DATA_NODES) < size


def node_count(size: int) -> int:
    """Number of physical nodes a file of ``size`` content bytes occupies."""
    if size <= MD_USER_DATA_SIZE:
        return 1
    return data_phys(data_node_of(size - 1)) + 1


def describe(phys: int) -> str:
    """Human name of a physical node, for error messages."""
    if phys == 0:
        return "metadata node"
    if phys == 1:
        return "root MHT node (node 1)"
    rel = phys - 1
    if rel % (1 + ATTACHED_DATA_NODES) == 0:
        return f"MHT node {rel // (1 + ATTACHED_DATA_NODES)} (node {phys})"
    m, k = divmod(rel, 1 + ATTACHED_DATA_NODES)
    return f"data node {m * ATTACHED_DATA_NODES + k - 1} (node {phys})"
