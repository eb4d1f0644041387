"""One `cove exec` in the daemon: start the helper (cove.daemon.execin), then relay its streams.

The helper gets its spec over a socket pair (never on its command line: the
environment may hold provisioned secrets) and, for a terminal, sends back
the master end of the pseudo-terminal it opened in the enclave. The relay
runs two threads for one client connection: the output one copies the
program's stdout and stderr (or the terminal) to the client as frames as
they come, then the exit code; the input one copies stdin frames to the
program and applies window sizes. A write to a program that does not read
blocks only the input thread, so output keeps flowing and the client's
socket pushes back; a client that leaves (end of stream, a broken pipe, a
malformed frame) ends the helper, which kills the program's session.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from typing import Any

from cove.daemon import execstream
from cove.errors import exit_status


HELPER_START = 30.0


class Helper:
    """The running helper: its process, its pipes and (with a terminal) the pty's master end."""

    def __init__(self, pid: int, spec: dict[str, Any], stdin: bool, module: str = "cove.daemon.execin") -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module, str(pid), str(child.fileno())],
                stdin=subprocess.PIPE if stdin and not spec.get("tty") else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(child.fileno(),),
                close_fds=True,
            )
        finally:
            child.close()
        self.master: int | None = None
        try:
            parent.sendall(json.dumps(spec).encode())
            parent.shutdown(socket.SHUT_WR)
            if spec.get("tty"):
                parent.settimeout(HELPER_START)
                try:
                    _, fds, _, _ = socket.recv_fds(parent, 16, 1)
                except (OSError, TimeoutError):
                    fds = []  # the helper failed before: its stderr says why
                self.master = fds[0] if fds else None
                for extra in fds[1:]:
                    os.close(extra)
        finally:
            parent.close()

    def end(self) -> None:
        """Kill the program's session (the helper's SIGTERM handler does it) and the helper."""
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGTERM)
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
            except ProcessLookupError:
                pass

    def close(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        if self.master is not None:
            os.close(self.master)
            self.master = None


class Kept:
    """The first and the last bytes of an output, at most ``limit`` in all, and how many were dropped between."""

    def __init__(self, limit: int) -> None:
        self.half = limit // 2
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def add(self, data: bytes) -> None:
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        self.tail += data
        if len(self.tail) > self.half:
            cut = len(self.tail) - self.half
            self.dropped += cut
            del self.tail[:cut]

    def value(self) -> bytes:
        return bytes(self.head + self.tail)


def buffered(
    helper: Helper, limits: tuple[int, int], timeout: float, client: socket.socket | None
) -> dict[str, Any] | None:
    """The answer without a stream: the exit code and both outputs (their first and last bytes, each at
    most its limit) once the program ends. Past ``timeout`` seconds the program's session is killed
    (``timed_out``); when the client closes its connection, too, and there is no answer (None)."""
    process = helper.process
    assert process.stdout is not None and process.stderr is not None
    out, err = Kept(limits[0]), Kept(limits[1])
    kept = {process.stdout.fileno(): out, process.stderr.fileno(): err}
    poller = select.poll()
    for fd in kept:
        poller.register(fd, select.POLLIN)
    watched = client.fileno() if client is not None else None
    if watched is not None:
        poller.register(watched, select.POLLIN | select.POLLRDHUP)
    pending = set(kept)
    ends = time.monotonic() + timeout
    timed_out = left = False
    try:
        while pending and not (timed_out or left):
            for fd, _ in poller.poll(max(0, min(500, int((ends - time.monotonic()) * 1000)))):
                if fd == watched:
                    left = _client_left(client)
                    poller.unregister(fd)  # closed, or it sent more: nothing more to learn from it
                    watched = None
                    continue
                data = os.read(fd, execstream.CHUNK)
                if data:
                    kept[fd].add(data)
                else:
                    poller.unregister(fd)
                    pending.discard(fd)
            timed_out = bool(pending) and time.monotonic() >= ends
        if pending:
            helper.end()  # the helper kills the program's whole session
        code = exit_status(process.wait())
    finally:
        helper.close()
    if left:
        return None
    return {
        "exit_code": code,
        "stdout": out.value().decode("utf-8", "replace"),
        "stderr": err.value().decode("utf-8", "replace"),
        "stdout_dropped": out.dropped,
        "stderr_dropped": err.dropped,
        "timed_out": timed_out,
    }


def _client_left(client: socket.socket | None) -> bool:
    """Whether the client closed its end (a readable socket with nothing to read)."""
    if client is None:
        return False
    try:
        return client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class Session:
    """The relay between one upgraded client connection and one helper."""

    def __init__(self, conn: socket.socket, reader: execstream.Reader, helper: Helper) -> None:
        self.conn, self.reader, self.helper = conn, reader, helper
        self.gone = threading.Event()  # the client left before the end
        self.finished = threading.Event()

    def run(self) -> int | None:
        """Relay until the program ends; its exit code, or None when the client left first."""
        inbound = threading.Thread(target=self._inbound, name="exec-stdin", daemon=True)
        inbound.start()
        try:
            code = self._outbound()
        finally:
            self.finished.set()
            self.helper.end()
            try:
                self.conn.shutdown(socket.SHUT_RDWR)  # wakes the input thread
            except OSError:
                pass
            inbound.join(timeout=10)
            self.helper.close()
        return code

    def _outbound(self) -> int | None:
        process, master = self.helper.process, self.helper.master
        assert process.stdout is not None and process.stderr is not None
        sources = {process.stdout.fileno(): execstream.STDOUT, process.stderr.fileno(): execstream.STDERR}
        if master is not None:
            sources[master] = execstream.STDOUT
        poller = select.poll()  # not select(): a busy daemon's descriptors may pass 1024
        for fd in sources:
            poller.register(fd, select.POLLIN)
        while sources and not self.gone.is_set():
            for fd, _ in poller.poll(500):
                try:
                    data = os.read(fd, execstream.CHUNK)
                except OSError as exc:
                    if exc.errno != errno.EIO:  # EIO: the terminal's last holder closed it
                        raise
                    data = b""
                if not data:
                    del sources[fd]
                    poller.unregister(fd)
                    continue
                if not self._send(execstream.frame(sources[fd], data)):
                    return None
        if self.gone.is_set():
            return None
        code = exit_status(process.wait())
        return code if self._send(execstream.exit_frame(code)) else None

    def _send(self, data: bytes) -> bool:
        try:
            self.conn.sendall(data)
            return True
        except OSError:
            self._leave()
            return False

    def _leave(self) -> None:
        if not self.finished.is_set():
            self.gone.set()
            self.helper.end()

    def _inbound(self) -> None:
        process, master = self.helper.process, self.helper.master
        stdin = process.stdin.fileno() if process.stdin is not None else None
        target = master if master is not None else stdin
        while True:
            try:
                item = execstream.read_frame(self.reader)
            except (execstream.ProtocolError, OSError, ValueError):
                item = None
            if item is None:
                self._leave()  # the client left (or broke the protocol) before the end
                return
            kind, payload = item
            if kind == execstream.RESIZE:
                try:
                    rows, cols = execstream.parse_resize(payload)
                except execstream.ProtocolError:
                    self._leave()
                    return
                if master is not None:  # without a terminal a window size means nothing
                    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            elif kind == execstream.STDIN and target is not None:
                if not payload:
                    if master is None and process.stdin is not None:
                        process.stdin.close()  # end of input; a terminal has none (Ctrl-D is a byte)
                    target = None
                    continue
                try:
                    _write_all(target, payload)
                except OSError:
                    target = None  # the program closed its input or ended: later input is dropped
            elif kind not in (execstream.STDIN, execstream.RESIZE):
                self._leave()  # frames only the daemon sends
                return


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
