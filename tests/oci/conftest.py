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
