"""An enclave's log, rotated by size: ``log``, then ``log.1`` (newer) to ``log.N-1`` (older).

With rotation on, the supervisor gives the enclave a pipe as stdout and
stderr and one thread of its own copies the pipe to ``log``: when the next
bytes would take it past its size, it writes up to the last whole line that
fits, shifts ``log.1`` to ``log.2`` and so on (the oldest beyond the count
goes), links ``log`` as ``log.1`` and renames a new empty file over ``log``
(so ``log`` never is missing), and goes on in that new ``log``. Nothing is lost
between the files: the writer is the only one, and it renames only after
its last write to the old file. Readers (``cove logs``) read the rotated
files oldest first; a follower that finds its file renamed drains it, then
goes on in the next newer one, found by inode.
"""

from __future__ import annotations

import _thread
import os
import re
import threading
import time

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

DEFAULT_MAX_BYTES = 10 << 20
DEFAULT_FILES = 3
MIN_BYTES = 4096
MAX_FILES = 100
TAIL_STEP = 64 << 10
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
    "gib": 1 << 30,
}


def parse_size(text: str) -> int:
    """``10MiB``, ``512k``, ``4096``: bytes (binary units); ValueError for anything else."""
    match = re.fullmatch(r"\s*([0-9]{1,12})\s*([A-Za-z]{0,3})\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 10MiB, 512KiB, 65536)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def rotated(log: Path, files: int) -> list[Path]:
    """The rotated files that may exist, newest first: log.1, log.2, ... log.(files-1)."""
    return [log.with_name(f"{log.name}.{k}") for k in range(1, max(files, 1))]


def existing(log: Path, files: int) -> list[Path]:
    """Every file of the log that exists, oldest first, the live ``log`` last."""
    return [p for p in reversed(rotated(log, files)) if p.exists()] + [log]


class Writer:
    """Copies a pipe's bytes to a rotated log (the supervisor's thread)."""

    def __init__(self, source: int, log: Path, max_bytes: int, files: int) -> None:
        self.source, self.log = source, log
        self.max_bytes, self.files = max(max_bytes, MIN_BYTES), max(1, min(files, MAX_FILES))
        self.fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self.fd).st_size
        self.done = threading.Event()

    def start(self) -> Writer:
        """Start the copying thread, not waiting until it runs (threading.Thread.start waits for that:
        on two busy cores a scheduler's slice of the supervisor's way to the launch). As a daemon
        thread, it does not hold the process's exit."""
        _thread.start_new_thread(self._copy, ())
        return self

    def _copy(self) -> None:
        try:
            self._run()
        finally:
            self.done.set()

    def _run(self) -> None:
        try:
            while data := os.read(self.source, 65536):
                self.write(data)
        finally:
            os.close(self.source)
            os.close(self.fd)

    def write(self, data: bytes) -> None:
        while data:
            room = self.max_bytes - self.size
            if len(data) <= room:
                self._put(data)
                return
            cut = data.rfind(b"\n", 0, room) + 1  # whole lines only, unless one line is larger than a file
            if cut == 0 and self.size == 0:
                cut = room
            self._put(data[:cut])
            data = data[cut:]
            self.rotate()

    def _put(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except OSError:
                return  # a full disk: the bytes go, the enclave does not block on its log
            self.size += written
            view = view[written:]

    def rotate(self) -> None:
        """Shift the files by one; ``log`` exists throughout (a reader opening it never finds it missing).

        The new file is made first under another name; the live one gets its ``log.1`` name as a second
        link, and the new file then replaces ``log`` in one rename.
        """
        fresh = self.log.with_name(self.log.name + ".new")
        fd = os.open(fresh, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        names = rotated(self.log, self.files)
        if names:
            for older, newer in zip(reversed(names), reversed(names[:-1])):
                if newer.exists():
                    os.replace(newer, older)
            try:
                os.unlink(names[0])
            except FileNotFoundError:
                pass
            os.link(self.log, names[0])
        os.replace(fresh, self.log)  # a count of one keeps only the live file: the old one goes here
        os.close(self.fd)
        self.fd, self.size = fd, 0

    def finish(self, timeout: float = 10.0) -> None:
        """Wait until every byte written to the pipe is in the log (its write ends must be closed)."""
        self.done.wait(timeout)


def newer(handle: BinaryIO, log: Path, files: int) -> BinaryIO | None:
    """The next newer file when the one ``handle`` reads was rotated away, else None."""
    ino = os.fstat(handle.fileno()).st_ino
    try:
        if os.stat(log).st_ino == ino:
            return None
    except FileNotFoundError:
        return None  # a rotation under way: the new log is not there yet
    chain = [log, *rotated(log, files)]
    for index, path in enumerate(chain[1:], start=1):
        try:
            if os.stat(path).st_ino == ino:
                return _open(chain[index - 1]) or _open(log)
        except FileNotFoundError:
            continue
    for path in reversed(chain):  # ours is gone altogether: the oldest that is left
        if (found := _open(path)) is not None:
            return found
    return None


def open_live(log: Path, files: int) -> BinaryIO:
    """The live file for reading; should it be missing (a rotation by an older supervisor, which renamed it
    away before making the new one), a moment later, or else the newest rotated file."""
    for path in (log, log, *rotated(log, files)[:1]):
        if (found := _open(path)) is not None:
            return found
        time.sleep(0.01)
    return open(log, "rb")  # still missing: the caller's FileNotFoundError


def _open(path: Path) -> BinaryIO | None:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        return None


def tail(log: Path, files: int, lines: int) -> bytes:
    """The last ``lines`` lines over every file of the log, read backwards in TAIL_STEP blocks.

    Only as much as those lines take is read, never whole files (they may be large, or unbounded with
    rotation off). A file seen twice (a second link during a rotation) counts once.
    """
    if lines <= 0:
        return b""
    blocks: list[bytes] = []  # newest first
    newlines = 0
    seen: set[tuple[int, int]] = set()
    for path in reversed(existing(log, files)):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            end = st.st_size
            while end > 0 and newlines <= lines:
                start = max(0, end - TAIL_STEP)
                block = os.pread(fd, end - start, start)
                blocks.append(block)
                newlines += block.count(b"\n")
                end = start
        finally:
            os.close(fd)
        if newlines > lines:
            break
    data = b"".join(reversed(blocks))
    parts = data.split(b"\n")
    kept = parts[-(lines + 1) :] if data.endswith(b"\n") else parts[-lines:]
    return b"\n".join(kept)


def older(handle: BinaryIO, log: Path, files: int) -> Iterator[bytes]:
    """The rotated files older than the one ``handle`` reads, oldest first, in chunks."""
    ino = os.fstat(handle.fileno()).st_ino
    for path in existing(log, files)[:-1]:
        try:
            with open(path, "rb") as older_handle:
                if os.fstat(older_handle.fileno()).st_ino == ino:
                    return
                while chunk := older_handle.read(65536):
                    yield chunk
        except FileNotFoundError:
            continue
