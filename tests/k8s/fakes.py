"""Real stand-ins for what a cluster provides: a kubelet's registration service, a node service socket."""

from __future__ import annotations

import http.server
import json
import os
import queue
import socketserver
import threading
from concurrent import futures
from pathlib import Path

import grpc

from cove.k8s.proto.deviceplugin.v1beta1 import api_pb2 as pb
from cove.k8s.proto.deviceplugin.v1beta1 import api_pb2_grpc as pb_grpc


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class FakeDaemon:
    """The node service's version endpoint on a real unix socket (docs/formats/daemon-api.md)."""

    def __init__(self, path: Path, answer: bytes | None = None):
        self.path = path
        self.answer = answer if answer is not None else json.dumps({"version": "0.1.0", "api": "v1"}).encode()
        self.server = None

    def start(self) -> None:
        answer = self.answer

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = answer if self.path == "/v1/version" else b"{}"
                self.send_response(200 if self.path == "/v1/version" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def address_string(self):
                return "unix"

            def log_message(self, *args):
                pass

        self.path.unlink(missing_ok=True)
        self.server = _UnixHTTPServer(str(self.path), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        self.path.unlink(missing_ok=True)


class FakeKubelet(pb_grpc.RegistrationServicer):
    """The kubelet's side: Registration on kubelet.sock; on Register it dials the plugin and watches it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.registered: queue.Queue[pb.RegisterRequest] = queue.Queue()
        self.updates: dict[str, queue.Queue] = {}
        self.stubs: dict[str, pb_grpc.DevicePluginStub] = {}
        self.channels: list[grpc.Channel] = []
        self.server = None

    def Register(self, request, context):
        if request.version != "v1beta1":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unsupported version")
        channel = grpc.insecure_channel(f"unix://{self.folder / request.endpoint}")
        self.channels.append(channel)
        stub = pb_grpc.DevicePluginStub(channel)
        updates = queue.Queue()
        self.updates[request.resource_name] = updates
        self.stubs[request.resource_name] = stub

        def watch():
            try:
                for response in stub.ListAndWatch(pb.Empty()):
                    updates.put(response)
            except grpc.RpcError:
                updates.put(None)

        threading.Thread(target=watch, daemon=True).start()
        self.registered.put(request)
        return pb.Empty()

    def start(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_RegistrationServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"unix://{self.folder / 'kubelet.sock'}")
        self.server.start()

    def stop(self, wipe: bool = True) -> None:
        """Stop as a restarting kubelet does: its socket goes, and (WIPE) every plugin socket with it."""
        self.server.stop(grace=0)
        for channel in self.channels:
            channel.close()
        self.channels.clear()
        (self.folder / "kubelet.sock").unlink(missing_ok=True)
        if wipe:
            for entry in os.listdir(self.folder):
                (self.folder / entry).unlink(missing_ok=True)

    def wait_registered(self, count: int, timeout: float = 20) -> list[pb.RegisterRequest]:
        return [self.registered.get(timeout=timeout) for _ in range(count)]
