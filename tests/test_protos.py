"""The committed gRPC modules are what grpcio-tools makes of the vendored protos."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import ROOT


def _generator():
    spec = importlib.util.spec_from_file_location("generate_protos", ROOT / "scripts" / "generate_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _generator()


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("protos")
    GENERATOR.generate(out)
    return out


@pytest.mark.parametrize("proto", GENERATOR.PROTOS)
def test_generated_modules_are_current(regenerated, proto):
    folder = Path(proto).parent
    for name in GENERATOR.GENERATED:
        fresh = (regenerated / folder / name).read_text()
        assert fresh == (GENERATOR.SRC / folder / name).read_text(), (
            f"{folder / name} is stale: run `.venv/bin/python scripts/generate_protos.py`"
        )
