"""The framed stream of `cove exec` after the HTTP upgrade (docs/formats/daemon-api.md), standard library only.

Both directions carry frames: an 8-byte header (kind, three zero bytes, the
payload's length as a big-endian 32-bit number, as Docker's attach stream
has) and the payload. The client sends stdin and window sizes; the daemon
sends stdout, stderr and, last, the exit code. Shared by the daemon and the
thin client, so it imports nothing of Cove.
"""

from __future__ import annotations

import struct
from typing import Protocol

PROTOCOL = "cove-exec/1"
STDIN, STDOUT, STDERR, EXIT, RESIZE = 0, 1, 2, 3, 4
HEADER = struct.Struct(">B3sI")
PAD = b"\0\0\0"
MAX_PAYLOAD = 1 << 20  # a larger frame is a protocol error: the session ends
CHUNK = 65536


class Reader(Protocol):
    """What frames are read from: a buffered reader of the socket (blocking, whole reads)."""

    def read(self, size: int, /) -> bytes: ...


class ProtocolError(Exception):
    """The peer sent something that is not a frame of this protocol."""


def frame(kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, PAD, len(payload)) + payload


def exit_frame(code: int) -> bytes:
    return frame(EXIT, struct.pack(">i", code))


def resize_frame(rows: int, cols: int) -> bytes:
    return frame(RESIZE, struct.pack(">HH", rows, cols))


def read_frame(reader: Reader) -> tuple[int, bytes] | None:
    """The next frame, or None at a clean end of the stream; ProtocolError for anything malformed."""
    head = reader.read(HEADER.size)
    if not head:
        return None
    if len(head) < HEADER.size:
        raise ProtocolError("the stream ended inside a frame header")
    kind, pad, size = HEADER.unpack(head)
    if pad != PAD:
        raise ProtocolError("a frame header's pad bytes are not zero")
    if kind > RESIZE:
        raise ProtocolError(f"unknown frame kind {kind}")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"a frame of {size} bytes (the limit is {MAX_PAYLOAD})")
    payload = reader.read(size) if size else b""
    if len(payload) < size:
        raise ProtocolError("the stream ended inside a frame")
    return kind, payload


def parse_resize(payload: bytes) -> tuple[int, int]:
    if len(payload) != 4:
        raise ProtocolError("a resize frame holds 4 bytes")
    rows, cols = struct.unpack(">HH", payload)
    return rows, cols


def parse_exit(payload: bytes) -> int:
    if len(payload) != 4:
        raise ProtocolError("an exit frame holds 4 bytes")
    code: int = struct.unpack(">i", payload)[0]
    return code
