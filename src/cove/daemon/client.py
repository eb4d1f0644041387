"""A thin client of the daemon's API (HTTP/JSON over its unix socket), standard library only.

`cove ps` and the other lifecycle commands import this and nothing heavy,
so they answer fast. Errors come back as RFC 7807 problem documents whose
``exit_code`` member is the code the same failure has without the daemon
(docs/cli.md), so the CLI exits alike both ways.
"""

from __future__ import annotations

import _socket  # socket.py imports enum, selectors and collections (milliseconds of a start): not needed here
import errno
import io
import os
import struct

# typing.TYPE_CHECKING without importing typing: `cove run` and `cove ps` import neither typing nor pathlib
# nor urllib.parse (several milliseconds of a start's CPU); mypy reads it as True
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import EllipsisType
    from typing import Any

API = "v1"
# `cove run` attached (docs/formats/daemon-api.md): POST /v1/enclaves upgraded to this protocol answers 101,
# then frames as the exec stream's (cove.daemon.execstream): the started enclave, its output, the ended one
ATTACH = "cove-attach/1"
OUTPUT, STARTED, ENDED = 1, 5, 6
FRAME_HEADER = struct.Struct(">B3sI")
MAX_FRAME = 1 << 20
SOCKET_ENV = "COVE_DAEMON_SOCKET"
DEFAULT_SOCKET = "/run/cove/cove.sock"
GROUP = "cove"
UNREACHABLE, REFUSED = 7, 6  # docs/cli.md's exit codes


def _not_serializable(value: object) -> None:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


class _ScanContext:
    """What json.JSONDecoder's defaults give the C scanner (make_scanner reads these attributes)."""

    strict = True
    object_hook = object_pairs_hook = array_hook = None
    parse_float, parse_int = float, int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__


# The json package's own C scanner and encoder, used without the package, whose import (re, enum) costs
# `cove run` more CPU than its requests; an interpreter without them (or with other signatures) uses json.
try:
    import _json

    _context: Any = _ScanContext()
    _scan: Any = _json.make_scanner(_context)
    _json.make_encoder({}, _not_serializable, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True)
except (ImportError, AttributeError, TypeError):  # pragma: no cover - CPython 3.11 to 3.14 have them
    _scan = None
_WHITESPACE = " \t\n\r"


def to_json(value: object) -> bytes:
    """json.dumps(value).encode(), byte for byte."""
    if _scan is None:  # pragma: no cover
        import json

        return json.dumps(value).encode()
    encode = _json.make_encoder(
        {}, _not_serializable, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )
    return "".join(encode(value, 0)).encode()


def from_json(data: bytes | str) -> Any:
    """json.loads of a UTF-8 document; ValueError (or RecursionError, nested too deep) when it is not one."""
    text = data.decode() if isinstance(data, bytes) else data
    if _scan is None:  # pragma: no cover
        import json

        return json.loads(text)
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration:
        raise ValueError("not a JSON document") from None
    if text[end:].strip(_WHITESPACE):
        raise ValueError("extra data after the JSON document")
    return value


class _SocketReader(io.RawIOBase):
    """socket.makefile's raw reader, for a _socket.socket."""

    def __init__(self, sock: _socket.socket):
        super().__init__()
        self.sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self.sock.recv_into(buffer)


UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _quote(value: object) -> str:
    """One query key or value, percent-encoded (RFC 3986: all but the unreserved characters), as
    urllib.parse.urlencode would send it apart from spaces (%20, not +); the daemon decodes both alike."""
    return "".join(chr(byte) if byte in UNRESERVED else f"%{byte:02X}" for byte in str(value).encode())


def socket_path() -> str:
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class DaemonError(Exception):
    """A failure as one line and the exit code the CLI uses (the API's problem, or no daemon)."""

    def __init__(self, line: str, exit_code: int, status: int | None = None, kind: str | None = None):
        super().__init__(line)
        self.line, self.exit_code, self.status, self.kind = line, exit_code, status, kind


class NotRunning(DaemonError):
    """No daemon answers on the socket."""


MAX_HEADERS = 100  # an answer's header lines
MAX_CHUNK = 1 << 24  # one chunk of a chunked answer (the daemon sends 64 KiB at most)


class _Response:
    """An HTTP/1.1 answer read from the socket: the daemon sends a Content-Length or a chunked body."""

    def __init__(self, sock: _socket.socket, path: str = ""):
        self.sock, self.path = sock, path
        self.file = io.BufferedReader(_SocketReader(sock))
        status_line = self.file.readline(65537)
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not (parts[1].isdigit() and len(parts[1]) == 3):
            raise ConnectionResetError(errno.ECONNRESET, "the daemon's answer is not HTTP")
        self.status = int(parts[1])
        self.headers: dict[str, str] = {}
        count = 0
        while (line := self.file.readline(65537)) not in (b"\r\n", b"\n", b""):
            count += 1
            if count > MAX_HEADERS:
                raise ConnectionResetError(errno.ECONNRESET, "the daemon's answer has too many headers")
            name, _, value = line.decode("latin-1").partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        length = self.headers.get("content-length", "0") or "0"
        if not (length.isascii() and length.isdigit()) or len(length) > 12:  # "²" is a digit to str.isdigit
            raise ConnectionResetError(errno.ECONNRESET, "the daemon's answer has a bad Content-Length")
        self.left = int(length)

    def chunks(self) -> Iterator[bytes]:
        """The body piece by piece, as it arrives (a malformed chunk: ConnectionResetError)."""
        if not self.chunked:
            while self.left > 0:
                data = self.file.read1(min(self.left, 65536))
                if not data:
                    raise ConnectionResetError(errno.ECONNRESET, "the daemon's answer ends early")
                self.left -= len(data)
                yield data
            return
        while True:
            line = self.file.readline(65537)
            if not line:
                raise ConnectionResetError(errno.ECONNRESET, "the daemon's answer ends early")
            digits = line.split(b";")[0].strip()
            # int(..., 16) would take "-2", "+2", "0x10" and "1_0": only hex digits, and a chunk of bounded size
            if not digits or len(digits) > 8 or digits.strip(b"0123456789abcdefABCDEF"):
                raise ConnectionResetError(errno.ECONNRESET, "the daemon's answer has a bad chunk")
            size = int(digits, 16)
            if size > MAX_CHUNK:
                raise ConnectionResetError(errno.ECONNRESET, "the daemon's answer has a chunk too large")
            if size == 0:
                self.file.readline(65537)
                return
            data = self.file.read(size)
            if len(data) != size:
                raise ConnectionResetError(errno.ECONNRESET, "the daemon's answer ends early")
            self.file.readline(65537)
            yield data

    def read(self) -> bytes:
        return b"".join(self.chunks())

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class Client:
    def __init__(self, path: str | None = None, timeout: float | None = 60.0):
        self.path = path or socket_path()
        self.timeout = timeout

    def _open(
        self,
        method: str,
        route: str,
        body: dict[str, Any] | None = None,
        query: dict[str, Any] | None = None,
        timeout: float | None | EllipsisType = ...,
        upgrade: str | None = None,
    ) -> _Response:
        """Send one request; ``timeout`` in seconds, None for none, ... for the client's default."""
        target = f"/{API}{route}"
        if query:
            target += "?" + "&".join(f"{_quote(k)}={_quote(v)}" for k, v in query.items() if v is not None)
        data = b"" if body is None else to_json(body)
        head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        if upgrade:
            head = head.replace("Connection: close", f"Connection: Upgrade\r\nUpgrade: {upgrade}")
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(self.timeout if timeout is ... else timeout)
        try:
            sock.connect(self.path)
            sock.sendall(head.encode() + b"\r\n" + data)
            return _Response(sock, self.path)
        except FileNotFoundError:
            sock.close()
            raise NotRunning(f"the Cove daemon is not running (no socket {self.path})", UNREACHABLE) from None
        except ConnectionRefusedError:
            sock.close()
            raise NotRunning(f"the Cove daemon is not running (nothing listens on {self.path})", UNREACHABLE) from None
        except PermissionError:
            sock.close()
            raise DaemonError(
                f"permission denied on {self.path}: the daemon serves root and the "
                f"`{GROUP}` group only (ask an administrator to add you to it)",
                REFUSED,
            ) from None
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.ENOTSOCK, errno.ECONNRESET, errno.EPIPE):
                raise NotRunning(
                    f"the Cove daemon is not answering on {self.path} ({exc.strerror})", UNREACHABLE
                ) from None
            raise

    def call(
        self,
        method: str,
        route: str,
        body: dict[str, Any] | None = None,
        query: dict[str, Any] | None = None,
        timeout: float | None | EllipsisType = ...,
    ) -> Any:
        try:
            response = self._open(method, route, body, query, timeout)
            try:
                data = response.read()
            finally:
                response.close()
        except TimeoutError:
            raise DaemonError(f"the Cove daemon did not answer on {self.path} in time", UNREACHABLE) from None
        except (ConnectionResetError, BrokenPipeError) as exc:  # cut short, or a malformed body
            raise DaemonError(
                f"the Cove daemon's answer on {self.path} broke off ({exc.strerror})", UNREACHABLE
            ) from None
        return self._decode(response, data)

    @staticmethod
    def _decode(response: _Response, data: bytes) -> Any:
        try:
            document = from_json(data) if data else None
        except (ValueError, RecursionError):  # not JSON, or nested too deep to decode
            document = None
        if response.status >= 400:
            problem = document if isinstance(document, dict) else {}
            line = problem.get("detail") or problem.get("title") or f"the daemon answered {response.status}"
            return_code = problem.get("exit_code")
            code = return_code if isinstance(return_code, int) and 0 < return_code < 256 else 2
            kind = problem.get("kind")
            raise DaemonError(
                " ".join(str(line).split()), code, response.status, kind if isinstance(kind, str) else None
            )
        return document

    def stream(self, route: str, query: dict[str, Any] | None = None) -> Iterator[bytes]:
        """The body of a streamed answer (logs -f, events), chunk by chunk, with no timeout."""
        response = self._open("GET", route, None, query, timeout=None)
        try:
            if response.status >= 400:
                self._decode(response, response.read())
            yield from response.chunks()
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise DaemonError(
                f"the Cove daemon's answer on {self.path} broke off ({exc.strerror})", UNREACHABLE
            ) from None
        finally:
            response.close()

    def upgrade(self, route: str, body: dict[str, Any], protocol: str) -> _Response:
        """POST asking to switch to ``protocol`` (`cove exec`'s stream); on 101 the answer's ``file`` (for
        reading) and ``sock`` (for writing) carry that protocol both ways. A refusal raises DaemonError."""
        response = self._open("POST", route, body, None, timeout=None, upgrade=protocol)
        if response.status != 101:
            data = response.read()
            response.close()
            self._decode(response, data)
            raise DaemonError(
                f"the daemon did not switch to {protocol} (it answered {response.status})", 2, response.status
            )
        return response

    def attach(self, body: dict[str, Any]) -> tuple[_Response | None, Any]:
        """POST /enclaves upgraded to cove-attach/1: (the stream, None) on 101 (read it with read_frame),
        else (None, the document answered): a daemon without the upgrade creates the enclave and answers
        it. A refusal raises DaemonError."""
        response = self._open("POST", "/enclaves", body, None, timeout=None, upgrade=ATTACH)
        if response.status == 101:
            if response.headers.get("upgrade", "").lower() != ATTACH:
                response.close()
                raise DaemonError(
                    f"the Cove daemon on {self.path} switched to another protocol than {ATTACH}", UNREACHABLE
                )
            return response, None
        try:
            data = response.read()
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise DaemonError(
                f"the Cove daemon's answer on {self.path} broke off ({exc.strerror})", UNREACHABLE
            ) from None
        finally:
            response.close()
        return None, self._decode(response, data)

    def running(self) -> bool:
        """Whether a daemon answers (a missing socket is the fast answer)."""
        if not os.path.exists(self.path):
            return False
        try:
            self.call("GET", "/version", timeout=5)
        except NotRunning:
            return False
        return True


def attach_frame(kind: int, payload: bytes) -> bytes:
    return FRAME_HEADER.pack(kind, b"\0\0\0", len(payload)) + payload


def read_frame(response: _Response) -> tuple[int, bytes]:
    """The next frame of an attach stream; DaemonError (exit 7) for an end or anything malformed."""
    try:
        head = response.file.read(FRAME_HEADER.size)
        if len(head) == FRAME_HEADER.size:
            kind, pad, size = FRAME_HEADER.unpack(head)
            if pad == b"\0\0\0" and kind in (OUTPUT, STARTED, ENDED) and size <= MAX_FRAME:
                payload = response.file.read(size) if size else b""
                if len(payload) == size:
                    return kind, payload
            why = "a malformed frame"
        else:
            why = "the stream ended before the enclave did"
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or "the stream broke"
    raise DaemonError(f"the Cove daemon's answer on {response.path} broke off ({why})", UNREACHABLE)
