"""One enclave instance and its OCI image, built once per session and shared by the OCI tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.helpers import make_instance


@pytest.fixture(scope="session")
def oci_instance(cove, tmp_path_factory) -> Path:
    """A built instance with shell tools (entry points /bin/ and /usr/bin/)."""
    return make_instance(cove, tmp_path_factory.mktemp("oci"), name="hello")


@pytest.fixture(scope="session")
def oci_tar(cove, oci_instance) -> Path:
    """The instance as a loadable OCI tarball, tagged cove-test/hello:1."""
    out = oci_instance.parent / "hello.oci.tar"
    cove.ok("package", "--oci", "--tag", "cove-test/hello:1", "-o", str(out), cwd=oci_instance)
    return out


RUNTIME = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "cove-runtime")


@pytest.fixture(scope="session")
def oci_layer(oci_tar, tmp_path_factory) -> Path:
    """The image's root file system layer (an uncompressed tar)."""
    import json
    import tarfile

    folder = tmp_path_factory.mktemp("layer")
    with tarfile.open(oci_tar) as archive:
        archive.extractall(folder, filter="data")
    manifest = json.loads((folder / "manifest.json").read_text())
    return folder / manifest[0]["Layers"][0]
