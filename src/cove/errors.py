"""The one exception type a user ever sees, and the exit codes of every command.

Every error a user can cause is raised as a :class:`CoveError` carrying one
line that names what is wrong and, where there is one, how to fix it. The CLI
prints that line and exits with the error's code from :class:`ExitCode`, one
table for every command (docs/cli.md); tracebacks appear only with ``--debug``.
"""

from __future__ import annotations

import errno
import os
import re
from enum import IntEnum


class ExitCode(IntEnum):
    """What a non-zero exit of any `cove` command means (documented in docs/cli.md).

    Small codes are Cove's own; ``cove run`` passes the enclave's own code
    through, so the sandbox's failures use Docker's and the shell's codes
    (125, 126, 127, 128 + signal) that programs rarely choose themselves.
    """

    OK = 0
    USAGE = 2  # a bad option, argument, cove.toml or input file
    INTEGRITY = 3  # what would run or be read is not what was measured, signed or sealed
    SETUP = 4  # a system dependency is missing (the line names the setup command)
    INVALID_EVIDENCE = 5  # evidence or a token is malformed, badly signed, expired or untrusted
    REFUSED = 6  # valid evidence the policy does not accept; a broker refused the request
    UNREACHABLE = 7  # a broker or service cannot be reached
    NOT_FOUND = 8  # a file, folder or instance named on the command line does not exist
    FILE_SYSTEM = 9  # a file cannot be read or written: read-only, disk full, I/O error
    SANDBOX = 125  # cove run: the sandbox could not start the enclave
    CANNOT_EXECUTE = 126  # cove run: the program is in the image but cannot be executed
    PROGRAM_NOT_FOUND = 127  # cove run: the program is not in the image
    SIGNAL = 128  # cove run: the enclave was killed by signal N: 128 + N
    INTERRUPTED = 130  # cove itself was interrupted (Ctrl-C): 128 + SIGINT
    OUT_OF_MEMORY = 137  # cove run: killed for exceeding resources.memory: 128 + SIGKILL


class CoveError(Exception):
    """A user-facing error: one clear line, an exit code."""

    exit_code: int = ExitCode.USAGE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def line(self) -> str:
        """The single line printed to the user."""
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(CoveError):
    """cove.toml is missing, malformed or invalid."""


class IntegrityError(CoveError):
    """What would run is not what was measured and signed."""

    exit_code = ExitCode.INTEGRITY


class SetupError(CoveError):
    """A system dependency is missing; the hint names the setup command."""

    exit_code = ExitCode.SETUP


class RefusedError(CoveError):
    """A policy or a service refused a well-formed request."""

    exit_code = ExitCode.REFUSED


class UnreachableError(CoveError):
    """A broker or another service cannot be reached."""

    exit_code = ExitCode.UNREACHABLE


class NotFoundError(CoveError):
    """A file, folder or instance the user named does not exist."""

    exit_code = ExitCode.NOT_FOUND


class FileSystemError(CoveError):
    """A file cannot be read or written (read-only, full, I/O error); the line names the file."""

    exit_code = ExitCode.FILE_SYSTEM


class SandboxError(CoveError):
    """The sandbox failed before or while starting the enclave (not the program's own exit)."""

    exit_code = ExitCode.SANDBOX


class CannotExecuteError(SandboxError):
    """The program exists in the image but cannot be executed (interpreter missing, not executable)."""

    exit_code = ExitCode.CANNOT_EXECUTE


class ProgramNotFoundError(SandboxError):
    """The program to run is not in the image."""

    exit_code = ExitCode.PROGRAM_NOT_FOUND


class OutOfMemoryError(SandboxError):
    """The enclave was killed for exceeding resources.memory."""

    exit_code = ExitCode.OUT_OF_MEMORY


_HINTS = {
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.ENOSPC: "the disk is full: free some space or choose another folder",
    errno.EDQUOT: "the disk quota is exhausted: free some space or choose another folder",
    errno.EIO: "an I/O error: the file cannot be read or written (special files such as /proc/self/mem "
    "cannot be copied)",
    errno.EACCES: "permission denied: choose a folder you may write, or fix its permissions",
    errno.EPERM: "not permitted: choose another folder, or fix its permissions",
}


# The temporary names Cove writes beside a file before renaming it into place:
# .NAME.RANDOM, .NAME.RANDOM.tmp, .NAME.RANDOM.cove-tmp, .NAME.cove-tmp, .NAME.cove-new
_TEMPORARY = re.compile(
    r"^\.(?P<name>.+?)(\.[A-Za-z0-9_]{8})?\.(tmp|cove-tmp|cove-new)$"
    r"|^\.(?P<bare>.+)\.[A-Za-z0-9_]{8}$"
)


def exit_status(returncode: int) -> int:
    """A child's return code (subprocess: -N after signal N) as a shell's exit status: 128 + N."""
    return ExitCode.SIGNAL - returncode if returncode < 0 else returncode


def _user_name(filename) -> str:
    """The file the user asked for, where the error names its temporary sibling."""
    text = os.fsdecode(filename)
    head, _, base = text.rpartition("/")
    match = _TEMPORARY.match(base)
    if match is None:
        return text
    name = match.group("name") or match.group("bare")
    return f"{head}/{name}" if head else name


def file_system_error(exc: OSError, action: str | None = None) -> CoveError:
    """An OSError as one line naming the file and what to do, with the table's code."""
    if action is None:
        action = "cannot write" if exc.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT) else "cannot access"
    name = _user_name(exc.filename) if exc.filename is not None else "a file"
    if exc.filename2 is not None:  # a copy or rename: a full or read-only disk is the destination's
        writing = exc.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT)
        name = _user_name(exc.filename2) if writing else f"{name} -> {_user_name(exc.filename2)}"
    reason = exc.strerror or os.strerror(exc.errno or 0) or str(exc)
    if exc.errno == errno.ENOENT:
        return NotFoundError(f"{action} {name}: {reason}")
    return FileSystemError(f"{action} {name}: {reason}", _HINTS.get(exc.errno or 0))
