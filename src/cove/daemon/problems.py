"""Problem documents (RFC 7807) of the daemon's API: one kind, one HTTP status, one CLI exit code.

Each failure the API reports is a :class:`Problem`. Its ``exit_code`` member
is the code `cove` exits with for the same failure without the daemon
(docs/cli.md), so the CLI behaves alike both ways. The ``type`` member is a
URN, ``urn:cove:daemon:error:<kind>``. A request the daemon cannot parse is a
4xx; an unexpected fault is logged and answered 500 with no detail.
"""

from __future__ import annotations

from typing import Any

from cove.errors import CoveError, ExitCode

TYPE_PREFIX = "urn:cove:daemon:error:"

# kind -> (HTTP status, title)
KINDS: dict[str, tuple[int, str]] = {
    "InvalidRequest": (400, "The request is malformed"),
    "Forbidden": (403, "Only root and the cove group may use the daemon"),
    "HostPaths": (403, "Only root's instances may name host paths through the daemon"),
    "NotFound": (404, "No such enclave, image or route"),
    "MethodNotAllowed": (405, "This route does not take this method"),
    "Conflict": (409, "The name is taken or the enclave's state forbids this"),
    "TooLarge": (413, "The request body is too large"),
    "UnsupportedMediaType": (415, "The body must be JSON"),
    "Unprocessable": (422, "The request is well formed but cannot be carried out"),
    "TooManyEnclaves": (429, "This user runs as many enclaves as the daemon allows"),
    "TooManyConnections": (503, "Too many connections from this user"),
    "InsufficientStorage": (507, "The store's disk is full"),
    "Internal": (500, "An internal error; the daemon's log has it"),
}


class Problem(Exception):
    def __init__(self, kind: str, detail: str | None = None, exit_code: int = ExitCode.USAGE):
        status, title = KINDS[kind]
        super().__init__(detail or title)
        self.kind, self.status, self.title, self.detail, self.exit_code = kind, status, title, detail, exit_code

    def document(self, instance: str | None = None) -> dict[str, Any]:
        body = {
            "type": TYPE_PREFIX + self.kind,
            "title": self.title,
            "status": self.status,
            "kind": self.kind,
            "exit_code": int(self.exit_code),
        }
        if self.detail:
            body["detail"] = self.detail
        if instance:
            body["instance"] = instance
        return body


def from_cove_error(exc: CoveError) -> Problem:
    """A user-facing error as a problem: a missing thing is 404, a clash 409, the rest 422."""
    code = int(exc.exit_code)
    if code == ExitCode.NOT_FOUND:
        kind = "NotFound"
    elif type(exc).__name__ == "ConflictError":
        kind = "Conflict"
    elif code == ExitCode.USAGE:
        kind = "InvalidRequest"
    else:
        kind = "Unprocessable"
    return Problem(kind, exc.line(), code)
