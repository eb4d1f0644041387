"""Regenerate the committed gRPC modules from the vendored CRI proto (see README.md here)."""

from __future__ import annotations

import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[3]  # the folder holding the `cove` package
PROTOS = ["cove/oci/proto/runtime/v1/api.proto"]


def generate(out: Path = SRC) -> None:
    """Compile every vendored proto into OUT (a tree mirroring src/)."""
    from grpc_tools import protoc  # build-time only: grpcio-tools

    for proto in PROTOS:
        (out / proto).parent.mkdir(parents=True, exist_ok=True)
        code = protoc.main(["grpc_tools.protoc", f"-I{SRC}", f"--python_out={out}", f"--pyi_out={out}",
                            f"--grpc_python_out={out}", str(SRC / proto)])
        if code != 0:
            raise SystemExit(f"protoc failed on {proto} (exit {code})")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else SRC)
