"""Is the node service up? One GET of its version over its unix socket.

The device plugin and the node agent follow the node service's health
(docs/formats/daemon-api.md: ``GET /v1/version`` on ``/run/cove/cove.sock``).
Standard library only, with a short timeout, so a hung daemon reads as down
instead of hanging the plugin's health loop.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from dataclasses import dataclass
from typing import Any

DEFAULT_SOCKET = "/run/cove/cove.sock"
SOCKET_ENV = "COVE_DAEMON_SOCKET"
VERSION_ROUTE = "/v1/version"


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
            info = json.loads(body)
        except ValueError:
            return Health(False, f"{self.path}: the version answer is not JSON", {})
        if not isinstance(info, dict):
            return Health(False, f"{self.path}: the version answer is not a JSON object", {})
        return Health(True, "ok", info)
