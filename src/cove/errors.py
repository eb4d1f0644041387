"""The one exception type a user ever sees.

Every error a user can cause is raised as a :class:`CoveError` carrying one
line that names what is wrong and, where there is one, how to fix it. The CLI
prints that line and exits non-zero; tracebacks appear only with ``--debug``.
"""

from __future__ import annotations


class CoveError(Exception):
    """A user-facing error: one clear line, an exit code."""

    exit_code = 2

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

    exit_code = 3


class SetupError(CoveError):
    """A system dependency is missing; the hint names the setup command."""

    exit_code = 4
