"""The /dev/attestation file system, served by the real service and read through a real FUSE mount.

These tests use the mount from the host side (no sandbox) to pin down the
file semantics; tests/e2e/test_attestation.py reads it from inside enclaves.
"""

from __future__ import annotations

import errno
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from cove.attest.cove_evidence_verify import verify_cove_evidence
from cove.attest.evidence import parse_report
from cove.config import parse as parse_config
from cove.runtime.attestation_service import AttestationService
from cove.runtime.backend import EnclaveIdentity
from cove.runtime.enclave_services import ServiceContext
from tests.conftest import require

CONFIG = parse_config('[enclave]\nname = "t"\n')


def identity(measurement=b"\x0a" * 32, signer=b"\x0b" * 32, svn=4) -> EnclaveIdentity:
    return EnclaveIdentity("t", measurement, signer, 9, svn, False)


@pytest.fixture
def serve(tmp_path, platform_paths):
    """Start /dev/attestation for an identity; yields the mount folder. Always stopped."""
    require("fusermount3")
    services = []

    def start(ident: EnclaveIdentity | None = None, name: str = "w") -> Path:
        ident = ident or identity()
        workdir = tmp_path / name
        workdir.mkdir()
        ctx = ServiceContext(ident, CONFIG, f"inst-{name}", "sim", "namespaces+seccomp", tmp_path / "state", workdir)
        service = AttestationService()
        services.append(service)
        binds = service.start(ctx)
        assert [(b.target, b.writable) for b in binds] == [("/dev/attestation", True)]
        return binds[0].host

    yield start
    for service in services:
        service.stop()
        assert service.mountpoint is None or not os.path.ismount(service.mountpoint)


def test_files_and_attestation_type(serve):
    mnt = serve()
    assert sorted(os.listdir(mnt)) == ["attestation_type", "keys", "quote", "report", "user_report_data"]
    assert (mnt / "attestation_type").read_bytes() == b"cove"
    assert sorted(os.listdir(mnt / "keys")) == ["_sgx_mrenclave", "_sgx_mrsigner"]
    assert (mnt / "user_report_data").read_bytes() == bytes(64)


def test_quote_binds_the_last_report_data(serve):
    mnt = serve()
    for data in (os.urandom(64), os.urandom(64)):
        (mnt / "user_report_data").write_bytes(data)
        assert (mnt / "user_report_data").read_bytes() == data
        claims = verify_cove_evidence((mnt / "quote").read_bytes(), datetime.now(timezone.utc))
        assert claims.report.report_data == data
        assert claims.report.measurement == b"\x0a" * 32 and claims.report.instance_id == "inst-w"
        assert parse_report(__import__("cbor2").loads((mnt / "report").read_bytes())["report"]).report_data == data


def test_report_data_writes_in_pieces_and_bad_writes_fail(serve):
    mnt = serve()
    data = bytes(range(64))
    fd = os.open(mnt / "user_report_data", os.O_WRONLY)
    os.write(fd, data[:10])
    os.write(fd, data[10:])
    os.close(fd)
    assert (mnt / "user_report_data").read_bytes() == data
    fd = os.open(mnt / "user_report_data", os.O_WRONLY)
    with pytest.raises(OSError) as err:
        os.write(fd, bytes(65))
    assert err.value.errno == errno.EINVAL
    os.close(fd)
    fd = os.open(mnt / "user_report_data", os.O_WRONLY)
    os.write(fd, b"short")
    with pytest.raises(OSError) as err:
        os.close(fd)  # a short write is reported when the file is closed
    assert err.value.errno == errno.EINVAL
    assert (mnt / "user_report_data").read_bytes() == data  # unchanged by the failed attempts


@pytest.mark.parametrize("name", ["quote", "report", "attestation_type", "keys/_sgx_mrenclave"])
def test_read_only_files(serve, name):
    mnt = serve()
    with pytest.raises(PermissionError):
        (mnt / name).write_bytes(b"x")


def test_cannot_create_or_remove(serve):
    mnt = serve()
    with pytest.raises(OSError):
        (mnt / "new").write_bytes(b"x")
    with pytest.raises(OSError):
        os.unlink(mnt / "quote")
    with pytest.raises(OSError):
        os.chmod(mnt / "quote", 0o666)


def test_each_enclave_gets_its_own_identity_and_keys(serve):
    a = serve(identity(measurement=b"\x01" * 32), "a")
    b = serve(identity(measurement=b"\x02" * 32), "b")
    c = serve(identity(measurement=b"\x01" * 32, svn=5), "c")
    now = datetime.now(timezone.utc)
    assert verify_cove_evidence((a / "quote").read_bytes(), now).report.measurement == b"\x01" * 32
    assert verify_cove_evidence((b / "quote").read_bytes(), now).report.measurement == b"\x02" * 32
    key = lambda m, p: (m / "keys" / f"_sgx_{p}").read_bytes()  # noqa: E731
    assert len(key(a, "mrenclave")) == 16
    assert key(a, "mrenclave") != key(b, "mrenclave")  # another measurement, another key
    assert key(a, "mrsigner") == key(b, "mrsigner")  # same signer and product
    assert key(a, "mrenclave") != key(c, "mrenclave")  # svn-aware
    assert key(a, "mrenclave") == key(a, "mrenclave")


def test_without_a_usable_platform_it_says_none(serve, platform_paths, capfd):
    platform_paths.dir.mkdir(parents=True)
    (platform_paths.dir / "platform.json").write_text('{"version": 99}')
    mnt = serve()
    assert (mnt / "attestation_type").read_bytes() == b"none"
    assert "quote" not in os.listdir(mnt)
    assert "cannot quote" in capfd.readouterr().err
