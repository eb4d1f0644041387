"""A per-run /dev/attestation server started early (before the build is verified), then adopted or ended.

`cove run` in direct mode starts the server's interpreter first, so its
imports and the platform key's loading overlap the runtime's own work; these
tests pin down that it serves the right identity when adopted, that nothing
is left when it is not, and that stopping detaches the mount and ends it.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

import pytest

from cove.attest.cove_evidence_verify import verify_cove_evidence
from cove.config import parse as parse_config
from cove.errors import CoveError
from cove.image.identity import EnclaveIdentity
from cove.runtime import attestation_early
from cove.runtime.attestation_service import AttestationService
from cove.runtime.enclave_services import ServiceContext
from tests.conftest import require

CONFIG = parse_config('[enclave]\nname = "t"\n')


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def context(tmp_path, platform_paths):
    require("fusermount3")
    workdir = tmp_path / "work"
    workdir.mkdir()
    identity = EnclaveIdentity("t", b"\x0c" * 32, b"\x0d" * 32, 3, 5, False)
    yield ServiceContext(identity, CONFIG, "inst-early", "sim", "namespaces+seccomp", tmp_path / "state", workdir)
    attestation_early.discard()


def test_a_prestarted_server_is_adopted_and_serves_the_identity(context):
    attestation_early.prestart()
    pid = attestation_early.pending()
    assert pid is not None
    service = AttestationService()
    try:
        service.begin(context)
        mount = service.start(context)[0].host
        assert service.process is not None and service.process.pid == pid  # no second interpreter
        assert attestation_early.pending() is None
        (mount / "user_report_data").write_bytes(b"\x42" * 64)
        report = verify_cove_evidence((mount / "quote").read_bytes(), datetime.now(timezone.utc)).report
        assert report.report_data == b"\x42" * 64 and report.measurement == b"\x0c" * 32 and report.svn == 5
    finally:
        service.stop()
    assert not os.path.ismount(mount) and gone(pid)


def test_an_unused_prestart_leaves_nothing(context):
    attestation_early.prestart()
    attestation_early.prestart()  # at most one waits
    pid = attestation_early.pending()
    assert pid is not None
    attestation_early.discard()
    assert attestation_early.pending() is None and gone(pid)


def test_a_prestarted_server_that_cannot_mount_fails_in_one_line(context):
    attestation_early.prestart()
    pid = attestation_early.pending()
    service = AttestationService()
    service.begin(context)
    os.rmdir(context.workdir / "attestation")  # the mountpoint is gone before the server mounts
    with pytest.raises(CoveError) as failed:
        service.start(context)
    assert "the /dev/attestation server failed to start" in failed.value.line()
    assert "\n" not in failed.value.line()
    service.stop()
    assert gone(pid)
