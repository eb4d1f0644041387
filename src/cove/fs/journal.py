"""The recovery file: an undo log that makes every commit atomic.

Layout (the same as Gramine's recovery file): a sequence of records, each a
little-endian u64 physical node number followed by the 4096 bytes that node
held in the last committed state. The file sits next to the protected file,
named ``<name>.gramine.recovery``.

Protocol, per transaction (from the first write-back after a commit to the
next commit):

1. the recovery file gets the committed metadata node, then (appended as
   needed) the committed content of every node about to be overwritten in
   place; it is written (and, when durable, fsynced) before the overwrite;
2. the protected file's metadata node gets the has-pending-write flag;
3. nodes are overwritten; the commit point is the write of the new metadata
   node, whose flag is clear; then the recovery file is emptied.

Opening a file whose flag is set replays the log: the file returns to the last
committed state. The log is untrusted input like the file itself: whatever it
restores is still checked against the MACs.
"""

from __future__ import annotations

import os
import struct

from cove.fs.errors import FileIntegrityError
from cove.fs.layout import HEADER, HAS_PENDING_WRITE, NODE_SIZE

RECOVERY_SUFFIX = ".gramine.recovery"
_PHYS = struct.Struct("<Q")
RECORD_SIZE = _PHYS.size + NODE_SIZE


def recovery_path(host_path: str) -> str:
    return os.fspath(host_path) + RECOVERY_SUFFIX


class UndoLog:
    """Appends undo records for one open protected file."""

    def __init__(self, path: str, durable: bool) -> None:
        self.path = path
        self.durable = durable
        self._fd: int | None = None
        self._end = 0
        self.logged: set[int] = set()
        self.active = False

    def begin(self, committed_meta: bytes) -> None:
        """Start a transaction: the log holds the committed metadata node."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(self._fd, 0)
        self._end = 0
        self.logged = set()
        self._append([(0, committed_meta)])
        self.active = True

    def save(self, main_fd: int, phys_numbers: list[int]) -> None:
        """Log the on-disk content of nodes about to be overwritten in place."""
        todo = sorted(p for p in set(phys_numbers) if p not in self.logged)
        if not todo:
            return
        records = []
        for phys in todo:
            old = os.pread(main_fd, NODE_SIZE, phys * NODE_SIZE)
            records.append((phys, old.ljust(NODE_SIZE, b"\0")))
        self._append(records)

    def _append(self, records: list[tuple[int, bytes]]) -> None:
        fd = self._fd
        if fd is None:
            raise RuntimeError("undo log: a record outside a transaction (begin() first)")
        blob = b"".join(_PHYS.pack(p) + bytes(data) for p, data in records)
        os.pwrite(fd, blob, self._end)
        if self.durable:
            os.fsync(fd)
        self._end += len(blob)
        self.logged.update(p for p, _ in records)

    def end(self) -> None:
        """The transaction committed: the log is no longer needed."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
        self._end = 0
        self.logged = set()
        self.active = False

    def close(self, remove: bool) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if remove:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def recover(host_path: str) -> None:
    """Roll a file with the has-pending-write flag back to its committed state.

    Node records are applied first and the metadata record last, so a crash
    during recovery leaves the flag set and recovery simply runs again. A
    trailing partial record (a crash while appending) is ignored: the node it
    was to protect had not been overwritten yet.
    """
    rpath = recovery_path(host_path)
    try:
        with open(rpath, "rb") as f:
            log = f.read()
    except FileNotFoundError:
        raise FileIntegrityError("has-pending-write flag set but the recovery file is missing") from None
    count = len(log) // RECORD_SIZE
    records = [
        (_PHYS.unpack_from(log, i * RECORD_SIZE)[0], log[i * RECORD_SIZE + _PHYS.size : (i + 1) * RECORD_SIZE])
        for i in range(count)
    ]
    meta = [data for phys, data in records if phys == 0]
    if not meta:
        raise FileIntegrityError("recovery file holds no metadata node; cannot roll back")
    fd = os.open(host_path, os.O_RDWR | os.O_CLOEXEC)
    try:
        limit = os.fstat(fd).st_size // NODE_SIZE + 1 + count
        for phys, data in records:
            if phys != 0:
                if phys > limit:
                    raise FileIntegrityError(f"recovery record for node {phys} is out of range")
                os.pwrite(fd, data, phys * NODE_SIZE)
        os.fsync(fd)
        os.pwrite(fd, meta[0], 0)
        os.fsync(fd)
        flags = os.pread(fd, HEADER.size, 0)[HEADER.size - 1]
        if flags & HAS_PENDING_WRITE:
            raise FileIntegrityError("recovery did not clear the has-pending-write flag")
    finally:
        os.close(fd)


def logged_metadata(host_path: str) -> bytes | None:
    """The metadata node the recovery file would restore, or None if it holds none.

    Lets a volume tell which committed state a replay returns to (its MAC
    is in the node's header) before deciding to replay.
    """
    try:
        with open(recovery_path(host_path), "rb") as f:
            record = f.read(RECORD_SIZE)
    except FileNotFoundError:
        return None
    if len(record) < RECORD_SIZE or _PHYS.unpack_from(record)[0] != 0:
        return None
    return record[_PHYS.size :]
