"""`cove exec` into a `vm` enclave, as the daemon's exec helper: ``python -m cove.runtime.vm_exec PID FD``.

It reads its spec (JSON: ``socket``, the launcher's exec socket, and ``argv``)
from the socket FD, sends the request to the launcher, writes the program's
output to its own stdout and stderr as the guest relays it, and exits with the
program's exit code, so the daemon treats it as it treats the helper of a
`sim` enclave. A refusal by the guest is one line on stderr and exit code
126; an enclave that ends first, one line and 125 (docs/backends.md).
"""

from __future__ import annotations

import json
import os
import socket
import sys

REFUSED, ENDED = 126, 125


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def relay(conn: socket.socket) -> int:
    """Copy the guest's lines for this exec to stdout and stderr; the exit code."""
    for raw in conn.makefile("rb"):
        line = raw.rstrip(b"\n").decode("ascii", "replace")
        kind, value = line[:1], line.partition(":")[2]
        if kind in ("o", "e"):
            try:
                _write(1 if kind == "o" else 2, bytes.fromhex(value))
            except ValueError:
                pass  # a malformed line from the guest is dropped
        elif kind == "x" and value.isdigit() and len(value) <= 3:
            return min(int(value), 255)
        elif kind == "r":
            reason = "".join(c if c.isprintable() else "?" for c in value[:300])
            print(f"cove: exec refused: {reason}", file=sys.stderr, flush=True)
            return REFUSED
    print("cove: the vm enclave ended before the program did", file=sys.stderr, flush=True)
    return ENDED


def main(argv: list[str]) -> int:
    with socket.socket(fileno=int(argv[1])) as spec_socket:
        data = b""
        while chunk := spec_socket.recv(65536):
            data += chunk
    spec = json.loads(data)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        try:
            conn.connect(spec["socket"])
            conn.sendall(json.dumps({"argv": spec["argv"]}).encode() + b"\n")
        except OSError as exc:
            print(f"cove: the vm enclave does not take exec requests: {exc.strerror or exc}", file=sys.stderr)
            return ENDED
        return relay(conn)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
