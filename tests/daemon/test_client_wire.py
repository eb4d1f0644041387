"""The thin client's JSON and socket reading without the json and socket packages: what they gave, byte for byte."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from cove.daemon.client import from_json, to_json

VALUES = [
    {"instance": "/tmp/a b", "program": "/bin/hello", "args": ["0", "-x", ""], "name": None, "backend": None},
    {"env": {"LANG": "C.UTF-8", "X": 'é\u2028\U0001f600\x00\x1f"\\/'}, "restart": "no", "signer": "ab" * 32},
    [1, -2, 3.5, 1e300, -0.0, True, False, None, [], {}, [[[]]], {"": ""}],
    {"nested": {"a": [{"b": [1, {"c": None}]}]}},
    "a string",
    12345678901234567890,
    float("inf"),
    float("nan"),
    {1: "int key", 2.5: "float key", False: "bool key", None: "null key"},
]


@pytest.mark.parametrize("value", VALUES)
def test_to_json_is_json_dumps(value):
    assert to_json(value) == json.dumps(value).encode()


def test_to_json_refuses_what_json_refuses():
    for value in ({"a": object()}, {("tuple", "key"): 1}, b"bytes", {1, 2}):
        with pytest.raises(TypeError):
            json.dumps(value)
        with pytest.raises(TypeError):
            to_json(value)
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(ValueError):
        to_json(loop)
    assert to_json([1, 2]) == b"[1, 2]"  # a failed call leaves nothing behind for the next


DOCUMENTS = [
    b'{"id": "abc", "exit_code": 3, "error": null}',
    b'  \n{"a": [1, 2.5, -3e2, true, false, null, "\\u00e9\\ud83d\\ude00"]}\r\n\t',
    b'[NaN, Infinity, -Infinity, {"": {}}]',
    b'"just a string"',
    b"0",
    '{"\u00e9": "\u2028"}'.encode(),
]


@pytest.mark.parametrize("data", DOCUMENTS)
def test_from_json_is_json_loads(data):
    assert repr(from_json(data)) == repr(json.loads(data))  # repr: NaN is not equal to itself
    assert repr(from_json(data.decode())) == repr(json.loads(data.decode()))


BAD = [b"", b"   ", b"not json!", b"{} {}", b'{"a": 1,}', b"[1, 2", b'{"a" 1}', b"\xff\xfe", b"garbage\r\n\r\n"]
BAD += [b"'single'", b"[1] x", b'"unterminated', b'"\\x"', b'"ctrl\x01"', b"01", b"[" * 100000]


@pytest.mark.parametrize("data", BAD, ids=range(len(BAD)))
def test_from_json_refuses_what_json_loads_refuses(data):
    with pytest.raises((ValueError, RecursionError)):
        json.loads(data)
    with pytest.raises((ValueError, RecursionError)):
        from_json(data)


def test_the_client_imports_neither_json_nor_socket():
    """What the daemon's client costs a start: neither package is imported with it."""
    code = (
        "import sys; import cove.daemon.client, cove.cli.attached; "
        "print(sorted(m for m in ('json', 'socket', 'signal', 're', 'enum', 'selectors') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_response_read_from_a_raw_socket(tmp_path):
    """The client reads lines, chunks and a timeout from its socket as socket.makefile's reader did."""
    from cove.daemon.client import Client, DaemonError

    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    body = b'{"items": [' + b", ".join(b'"%d"' % i for i in range(20000)) + b"]}"  # several reads
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 999]), body[i : i + 999]) for i in range(0, len(body), 999))
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n",
        None,  # says nothing: the client's timeout
    ]
    import threading

    def serve() -> None:
        for answer in answers:
            connection, _ = listener.accept()
            connection.recv(1 << 16)
            if answer is None:
                threading.Event().wait(3)
            else:
                connection.sendall(answer)
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client = Client(path)
        for _ in range(2):
            assert client.call("GET", "/enclaves") == {"items": [str(i) for i in range(20000)]}
        with pytest.raises(DaemonError, match="did not answer .* in time"):
            client.call("GET", "/enclaves", timeout=0.5)
    finally:
        listener.close()


HOSTILE_ANSWERS = {
    "a non-ASCII digit as the length": "HTTP/1.1 200 OK\r\nContent-Length: \u00b2\r\n\r\n{}".encode("latin-1"),
    "a length of 10,000 digits": b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 10000 + b"\r\n\r\n{}",
    "a status of 10,000 digits": b"HTTP/1.1 " + b"2" * 10000 + b" OK\r\nContent-Length: 2\r\n\r\n{}",
    "a negative chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\n{}\r\n0\r\n\r\n",
    "a 0x chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n",
    "a chunk of 2**60 bytes": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFF\r\n{}\r\n",
    "a chunk cut short": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{}",
    "chunks that stop": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n",
    "a body shorter than its length": b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{}",
    "a thousand headers": b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 1000 + b"Content-Length: 2\r\n\r\n{}",
}


def test_a_hostile_answer_is_one_daemon_error(tmp_path):
    """Whatever bytes come back, the client raises its DaemonError (one line, exit code UNREACHABLE): never
    ValueError or MemoryError (a traceback), never a short body taken for the whole."""
    import threading

    from cove.daemon.client import UNREACHABLE, Client, DaemonError

    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    answers = list(HOSTILE_ANSWERS.values())

    def serve() -> None:
        for answer in answers:
            connection, _ = listener.accept()
            connection.recv(1 << 16)
            connection.sendall(answer)
            connection.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        client = Client(path, timeout=10)
        for case in HOSTILE_ANSWERS:
            with pytest.raises(DaemonError) as caught:
                client.call("GET", "/enclaves")
            assert caught.value.exit_code == UNREACHABLE and "\n" not in caught.value.line, case
    finally:
        listener.close()
