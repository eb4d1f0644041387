"""Writing TCG2 (crypto-agile) event logs for tests, independently of the parser under test."""

from __future__ import annotations

import hashlib
import struct

ALG_IDS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C}
EV_NO_ACTION, EV_POST_CODE, EV_SEPARATOR = 0x3, 0x1, 0x4


def header(banks=("sha1", "sha256")) -> bytes:
    spec = b"Spec ID Event03\x00" + struct.pack("<I", 0) + bytes([0, 2, 0, 2])
    spec += struct.pack("<I", len(banks))
    for bank in banks:
        spec += struct.pack("<HH", ALG_IDS[bank], hashlib.new(bank).digest_size)
    spec += b"\x00"
    return struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(spec)) + spec


def event(pcr: int, data: bytes, banks=("sha1", "sha256"), etype: int = EV_POST_CODE) -> bytes:
    out = struct.pack("<III", pcr, etype, len(banks))
    for bank in banks:
        out += struct.pack("<H", ALG_IDS[bank]) + hashlib.new(bank, data).digest()
    return out + struct.pack("<I", len(data)) + data


def startup_locality(locality: int, banks=("sha1", "sha256")) -> bytes:
    body = b"StartupLocality\x00" + bytes([locality])
    out = struct.pack("<III", 0, EV_NO_ACTION, len(banks))
    for bank in banks:
        out += struct.pack("<H", ALG_IDS[bank]) + bytes(hashlib.new(bank).digest_size)
    return out + struct.pack("<I", len(body)) + body


def log(measurements: list[tuple[int, bytes]], banks=("sha1", "sha256"), locality: int | None = None) -> bytes:
    out = header(banks)
    if locality is not None:
        out += startup_locality(locality, banks)
    for pcr, data in measurements:
        out += event(pcr, data, banks)
    return out
