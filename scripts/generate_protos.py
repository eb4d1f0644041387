"""Regenerate Cove's committed gRPC modules from the vendored protos (build time only: grpcio-tools).

One generator for every vendored proto, so the kubelet device-plugin API
(`src/cove/k8s/proto`) and the CRI API (`src/cove/oci/proto`) are compiled
the same way; `tests/test_protos.py` fails when a committed module is stale.

    .venv/bin/python scripts/generate_protos.py [OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"  # the folder holding the `cove` package
PROTOS = [
    "cove/k8s/proto/deviceplugin/v1beta1/api.proto",  # kubelet device plugin API (src/cove/k8s/proto/README.md)
    "cove/oci/proto/runtime/v1/api.proto",  # CRI runtime.v1 (src/cove/oci/proto/README.md)
]
GENERATED = ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py")


def generate(out: Path = SRC) -> None:
    """Compile every vendored proto into OUT (a tree mirroring src/)."""
    from grpc_tools import protoc

    for proto in PROTOS:
        (out / proto).parent.mkdir(parents=True, exist_ok=True)
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{SRC}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                str(SRC / proto),
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed on {proto} (exit {code})")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else SRC)
