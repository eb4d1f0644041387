"""An interactive enclave's own terminal, relayed to the user's (as `docker run -t`).

The enclave never gets the user's terminal itself: a program in it could
otherwise push keystrokes into the host shell (TIOCSTI) or, being in another
pid namespace, fail to take the terminal over for job control (dash's
"Cannot set tty process group"). Cove opens a fresh pseudo-terminal, puts the
user's terminal in raw mode, and copies bytes both ways; the sandbox makes
the program the leader of a new session whose controlling terminal is that
pseudo-terminal (see cove.runtime.sim), so job control, Ctrl-C and Ctrl-Z
work inside, and the user's terminal is restored afterwards.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import termios
import threading
import tty
from collections.abc import Callable
from types import FrameType
from typing import Any

STDIN, STDOUT, STDERR = 0, 1, 2
_attached: set[str] = set()  # the devices of the terminals attached right now


def is_own(fd: int) -> bool:
    """Whether fd is a terminal Cove made for an enclave (and not the user's own)."""
    return os.isatty(fd) and os.ttyname(fd) in _attached


class Settings:
    """The settings (termios attributes, window size) of the user's terminals on stdin, stdout and
    stderr, taken before a sandbox starts and put back after it (restore).

    Without its own pseudo-terminal, a program whose stdout is the user's terminal can turn echo off
    or change the window size; being in another session, nothing stops it, and the change would
    outlast the run. Only a terminal whose settings changed is written to, with SIGTTOU blocked: a
    `cove run ... &` in the background is not stopped for it.
    """

    def __init__(self, fds: tuple[int, ...] = (STDIN, STDOUT, STDERR)) -> None:
        self._saved: list[tuple[int, list[Any], bytes | None]] = []
        seen: set[int] = set()
        for fd in fds:
            try:
                if not os.isatty(fd) or is_own(fd) or os.fstat(fd).st_rdev in seen:
                    continue
                attributes = termios.tcgetattr(fd)
                copy = os.dup(fd)  # the same terminal at restore, whatever fd then is
            except (OSError, termios.error):
                continue
            seen.add(os.fstat(copy).st_rdev)
            self._saved.append((copy, attributes, _window_size(copy)))

    def restore(self) -> None:
        """Put back what changed since; then forget (a second call does nothing)."""
        saved, self._saved = self._saved, []
        for fd, attributes, size in saved:
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
            try:
                if termios.tcgetattr(fd) != attributes:
                    termios.tcsetattr(fd, termios.TCSANOW, attributes)
                if size is not None and _window_size(fd) != size:
                    fcntl.ioctl(fd, termios.TIOCSWINSZ, size)
            except (OSError, termios.error):
                pass  # the terminal is gone: nothing to put back
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
                os.close(fd)


def _window_size(fd: int) -> bytes | None:
    try:
        return fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
    except OSError:
        return None


class Terminal:
    """A pseudo-terminal while an interactive enclave starts and runs; use as a context manager."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self._saved_attrs = termios.tcgetattr(STDIN)
        self._saved_fds: list[int] = []
        self._previous_winch: Callable[[int, FrameType | None], Any] | int | None = None
        self._user_in, self._user_out = os.dup(STDIN), os.dup(STDOUT)  # before attach() replaces them
        self._master_lock = threading.Lock()
        self._wake_read, self._wake_write = os.pipe()  # ends the output thread's wait on the master
        self._output = threading.Thread(target=self._copy_output, daemon=True)
        self._input = threading.Thread(target=self._copy_input, daemon=True)

    @staticmethod
    def wanted() -> bool:
        """Whether the user is at a terminal (stdin and stdout both are one)."""
        return os.isatty(STDIN) and os.isatty(STDOUT)

    def __enter__(self) -> Terminal:
        self._copy_size()
        self._previous_winch = signal.signal(signal.SIGWINCH, lambda *_: self._copy_size())
        tty.setraw(STDIN, termios.TCSANOW)
        self._output.start()
        self._input.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.detach()
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1
        self._output.join(timeout=2)  # the rest of the enclave's output
        self._hang_up()
        self._output.join(timeout=2)
        termios.tcsetattr(STDIN, termios.TCSAFLUSH, self._saved_attrs)
        signal.signal(signal.SIGWINCH, self._previous_winch or signal.SIG_DFL)
        self._close_master()
        os.close(self._user_out)  # _user_in stays with the input thread, blocked in read until cove exits

    def attach(self) -> None:
        """Make stdin, stdout and stderr the pseudo-terminal, for the sandbox about to start."""
        self._saved_fds = [os.dup(fd) for fd in (STDIN, STDOUT, STDERR)]
        _attached.add(os.ttyname(self.slave))
        for fd in (STDIN, STDOUT, STDERR):
            os.dup2(self.slave, fd)

    def detach(self) -> None:
        """Give stdin, stdout and stderr back (the sandbox has its own copies now)."""
        for fd, saved in zip((STDIN, STDOUT, STDERR), self._saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        self._saved_fds = []
        if self.slave >= 0:
            _attached.discard(os.ttyname(self.slave))
            os.close(self.slave)  # the output ends when the enclave's last copy closes
            self.slave = -1

    def _copy_size(self) -> None:
        try:
            size = fcntl.ioctl(self._user_out, termios.TIOCGWINSZ, b"\0" * 8)
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)
        except OSError:
            pass

    def _hang_up(self) -> None:
        """Have the output thread close the pseudo-terminal: what still runs on it gets SIGHUP,
        as on a closed terminal. (Closing it here would not: a read in progress keeps it open.)"""
        try:
            os.write(self._wake_write, b"x")
        except OSError:
            pass

    def _close_master(self) -> None:
        with self._master_lock:
            if self.master >= 0:
                os.close(self.master)
                self.master = -1

    def _copy_output(self) -> None:
        try:
            while True:
                ready = select.select([self.master, self._wake_read], [], [])[0]
                if self._wake_read in ready:
                    return
                try:
                    data = os.read(self.master, 65536)
                except OSError as exc:  # EIO: every copy of the other end is closed
                    if exc.errno in (errno.EIO, errno.EBADF):
                        return
                    raise
                if not data:
                    return
                _write_all(self._user_out, data)
        except OSError:  # the user's terminal is gone
            return
        finally:
            self._close_master()

    def _copy_input(self) -> None:
        try:
            while data := os.read(self._user_in, 65536):  # raw mode: only a closed terminal ends this
                _write_all(self.master, data)
        except OSError:
            pass  # the user's terminal or the enclave's is gone
        self._hang_up()


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]
