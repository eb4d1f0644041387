"""The committed gRPC modules are what grpcio-tools makes of the vendored proto."""

from __future__ import annotations

from pathlib import Path

from cove.k8s.proto import generate


def test_generated_modules_are_current(tmp_path):
    generate.generate(tmp_path)
    folder = Path("cove/k8s/proto/deviceplugin/v1beta1")
    for name in ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py"):
        assert (tmp_path / folder / name).read_text() == (generate.SRC / folder / name).read_text(), \
            f"{name} is stale: run `python -m cove.k8s.proto.generate`"
