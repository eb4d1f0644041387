"""`cove exec` into a `vm` enclave, as the daemon's exec helper: ``python -m cove.runtime.vm_exec PID FD``.

It reads its spec (JSON: ``socket``, the launcher's exec socket, ``argv``,
and ``stdin``, ``tty``, ``rows``, ``cols`` as the daemon has them) from the
socket FD, sends the request to the launcher, writes the program's output
to its own stdout and stderr as the guest relays it, and exits with the
program's exit code, so the daemon treats it as it treats the helper of a
`sim` enclave. With ``stdin`` it sends what comes on its own stdin; with
``tty`` it opens a host pseudo-terminal in raw mode (a plain byte pipe: the
terminal that counts is the guest's, which the guest init opens), sends its
master end back over FD as the `sim` helper does, relays the terminal's
bytes both ways, and passes each new window size on (SIGWINCH, as the
terminal's controlling process). A refusal by the guest is one line on
stderr and exit code 126; an enclave that ends first, or an exit line that
is not 1-3 ASCII digits, one line and 125 (docs/backends.md).
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import re
import signal
import socket
import struct
import sys
import termios
import threading
import tty as tty_mode

from cove import util

REFUSED, ENDED = 126, 125
CHUNK = 4096  # input bytes per line to the launcher (its limit)


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def relay(conn: socket.socket, out: int = 1, err: int = 2) -> int:
    """Copy the guest's lines for this exec to OUT and ERR; the exit code."""
    for raw in conn.makefile("rb"):
        line = raw.rstrip(b"\n").decode("ascii", "replace")
        kind, value = line[:1], line.partition(":")[2]
        if kind in ("o", "e"):
            try:
                _write(out if kind == "o" else err, bytes.fromhex(value))
            except ValueError:
                pass  # a malformed line from the guest is dropped
            except OSError:
                return ENDED  # the daemon closed our output: it is ending the session
        elif kind == "x":
            if re.fullmatch("[0-9]{1,3}", value):  # ASCII only: str.isdigit() takes '²', which int() refuses
                return min(int(value), 255)
            print("cove: the vm guest sent a malformed exit code", file=sys.stderr, flush=True)
            return ENDED
        elif kind == "r":
            reason = "".join(c if c.isprintable() else "?" for c in value[:300])
            print(f"cove: exec refused: {reason}", file=sys.stderr, flush=True)
            return REFUSED
    print("cove: the vm enclave ended before the program did", file=sys.stderr, flush=True)
    return ENDED


class _Sender:
    """One thread writes every line to the launcher: the input reader and the SIGWINCH handler only
    queue (a handler must never wait for a socket), the input at most a few lines ahead."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.lines: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.room = threading.Semaphore(8)
        threading.Thread(target=self._send, daemon=True).start()

    def _send(self) -> None:
        while (line := self.lines.get()) is not None:
            try:
                self.conn.sendall(line)
            except OSError:
                return  # the launcher is gone: reading its lines says how
            if line[:1] == b"i":
                self.room.release()

    def input(self, data: bytes) -> None:
        self.room.acquire()
        self.lines.put(b"i" + data.hex().encode() + b"\n")

    def window(self, fd: int) -> None:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
        self.lines.put(b"w%d:%d\n" % (rows, cols))


def _copy_input(fd: int, sender: _Sender, end: bool) -> None:
    """FD's bytes as input lines; at its end, the end of the input (END: not for a terminal)."""
    try:
        while data := os.read(fd, CHUNK):
            sender.input(data)
    except OSError:
        return  # a terminal whose other side closed: the session is ending
    if end:
        sender.input(b"")


def _terminal(spec_socket: socket.socket, rows: int, cols: int) -> int:
    """A raw host pty as this process's controlling terminal; its master end goes to the daemon."""
    master, slave = os.openpty()
    tty_mode.setraw(slave, termios.TCSANOW)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)  # so a new size set on the master arrives as SIGWINCH
    socket.send_fds(spec_socket, [b"m"], [master])
    os.close(master)
    return slave


def main(argv: list[str]) -> int:
    util.die_with_parent(signal.SIGTERM)  # dies with the daemon's session thread
    with socket.socket(fileno=int(argv[1])) as spec_socket:
        data = b""
        while chunk := spec_socket.recv(65536):
            data += chunk
        spec = json.loads(data)
        tty, stdin = bool(spec.get("tty")), bool(spec.get("stdin"))
        rows, cols = int(spec.get("rows") or 24), int(spec.get("cols") or 80)
        slave = _terminal(spec_socket, rows, cols) if tty else None
    request = {"argv": spec["argv"], "stdin": stdin, "tty": tty, "rows": rows, "cols": cols}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        try:
            conn.connect(spec["socket"])
            conn.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            print(f"cove: the vm enclave does not take exec requests: {exc.strerror or exc}", file=sys.stderr)
            return ENDED
        sender = _Sender(conn)
        if slave is not None:
            signal.signal(signal.SIGWINCH, lambda _signum, _frame: sender.window(slave))
            threading.Thread(target=_copy_input, args=(slave, sender, False), daemon=True).start()
            return relay(conn, slave, slave)
        if stdin:
            threading.Thread(target=_copy_input, args=(0, sender, True), daemon=True).start()
        return relay(conn)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
