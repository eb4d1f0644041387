"""Is the node service up? One GET of its version over its unix socket.

The device plugin and the node agent follow the node service's health
(docs/formats/daemon-api.md: ``GET /v1/version`` on ``/run/cove/cove.sock``).
Plain http.client with a short timeout, so a hung daemon reads as down
instead of hanging the plugin's health loop; the answer is read through
cove.decode, so a hostile one is down with a reason, not an exception.
"""

from __future__ import annotations

import http.client
import os
import socket
from dataclasses import dataclass
from typing import Any

from cove.decode import Fields, decode_json

DEFAULT_SOCKET = "/run/cove/cove.sock"
SOCKET_ENV = "COVE_DAEMON_SOCKET"
VERSION_ROUTE = "/v1/version"
TEXT_FIELDS = ("version", "api", "backend", "platform")


def daemon_socket() -> str:
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


@dataclass(frozen=True)
class Health:
    """The node service's answer, or why there was none."""

    up: bool
    detail: str
    info: dict[str, Any]


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class DaemonProbe:
    """Probes the node service; any answer but 200 with a JSON object is down."""

    def __init__(self, path: str | None = None, timeout: float = 2.0):
        self.path = path or daemon_socket()
        self.timeout = timeout

    def __call__(self) -> Health:
        connection = _Unix(self.path, self.timeout)
        try:
            connection.request("GET", VERSION_ROUTE)
            response = connection.getresponse()
            body = response.read(65536)
        except FileNotFoundError:
            return Health(False, f"no socket {self.path}", {})
        except OSError as exc:  # refused, timed out, reset
            return Health(False, f"{self.path}: {exc.strerror or exc}", {})
        except http.client.HTTPException as exc:
            return Health(False, f"{self.path}: bad HTTP answer ({type(exc).__name__})", {})
        finally:
            connection.close()
        if response.status != 200:
            return Health(False, f"{self.path}: HTTP {response.status}", {})
        try:
            info = decode_json(body, ValueError, "the version answer")
        except ValueError:  # malformed, not UTF-8, nested too deep, trailing bytes
            return Health(False, f"{self.path}: the version answer is not JSON", {})
        if not isinstance(info, dict):
            return Health(False, f"{self.path}: the version answer is not a JSON object", {})
        try:  # the fields the node agent turns into labels (docs/formats/daemon-api.md)
            fields = Fields(info, "the version answer", ValueError)
            for key in TEXT_FIELDS:
                if fields.has(key):
                    fields.text(key)
        except ValueError as exc:
            return Health(False, f"{self.path}: {exc}", {})
        return Health(True, "ok", info)
