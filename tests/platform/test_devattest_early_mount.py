"""A prestarted /dev/attestation server mounts before its platform key has loaded, so `cove run` need not wait.

The key's loading is held back by holding the platform folder's lock (what
any other `cove` command using the platform holds); the service must hand
over its bind at once, the enclave's first request must wait until the key
is there and then get a real quote, and what the server says later (the
"cannot quote" warning, or that it died) must still reach stderr in one
line.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pytest

from cove.attest.cove_evidence_verify import verify_cove_evidence
from cove.config import parse as parse_config
from cove.image.identity import EnclaveIdentity
from cove.platform import monitor
from cove.runtime import attestation_early
from cove.runtime.attestation_service import AttestationService
from cove.runtime.enclave_services import ServiceContext
from tests.conftest import require

CONFIG = parse_config('[enclave]\nname = "t"\n')


@pytest.fixture
def context(tmp_path, platform_paths):
    require("fusermount3")
    monitor.signer(platform_paths)  # the platform exists; only its loading in the server is held back
    workdir = tmp_path / "work"
    workdir.mkdir()
    identity = EnclaveIdentity("t", b"\x0e" * 32, b"\x0f" * 32, 1, 2, False)
    yield ServiceContext(identity, CONFIG, "inst-mounted", "sim", "namespaces+seccomp", tmp_path / "state", workdir)
    attestation_early.discard()


@contextmanager
def platform_held(paths) -> Iterator[None]:
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _in_thread(call):
    """Run call in a thread; (thread, results) where results gets its value or exception."""
    results: list[object] = []

    def run() -> None:
        try:
            results.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            results.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, results


def test_the_bind_comes_before_the_key_and_the_first_read_waits_for_it(context, platform_paths):
    service = AttestationService()
    with platform_held(platform_paths):
        attestation_early.prestart()
        service.begin(context)
        started = time.monotonic()
        mount = service.start(context)[0].host  # must not wait for the key
        assert time.monotonic() - started < 15
        assert service.follower is not None  # it said "mounted": the key is still loading
        reader, results = _in_thread(lambda: (mount / "quote").read_bytes())
        reader.join(0.5)
        assert reader.is_alive() and not results  # the request waits in the kernel for the key
    try:
        reader.join(30)
        assert results and isinstance(results[0], bytes), results
        report = verify_cove_evidence(results[0], datetime.now(timezone.utc)).report
        assert report.measurement == b"\x0e" * 32 and report.instance_id == "inst-mounted"
    finally:
        service.stop()
    assert not os.path.ismount(mount)


def test_cannot_quote_after_the_mount_is_still_one_warning(context, platform_paths, capfd):
    service = AttestationService()
    with platform_held(platform_paths):
        attestation_early.prestart()
        service.begin(context)
        mount = service.start(context)[0].host
        (platform_paths.dir / "platform.json").write_text('{"version": 99}')  # unusable by the time it loads
    try:
        assert (mount / "attestation_type").read_bytes() == b"none"
    finally:
        service.stop()
    err = capfd.readouterr().err
    assert err.count("cove: warning: /dev/attestation cannot quote:") == 1
    assert "failed to start" not in err  # the stop is not reported as a failure


def test_a_server_that_dies_after_the_mount_is_one_line_and_requests_fail(context, platform_paths, capfd):
    service = AttestationService()
    with platform_held(platform_paths):
        attestation_early.prestart()
        service.begin(context)
        mount = service.start(context)[0].host
        assert service.process is not None and service.follower is not None
        os.kill(service.process.pid, signal.SIGKILL)
        service.follower.join(10)
    try:
        with pytest.raises(OSError) as failed:
            (mount / "quote").read_bytes()
        assert failed.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.ENOENT)
    finally:
        service.stop()
    err = capfd.readouterr().err
    assert err.count("the /dev/attestation server failed to start") == 1
    assert "Traceback" not in err
    assert str(mount) not in Path("/proc/mounts").read_text()  # the dead server's mount is detached too


def test_a_run_ending_before_the_key_has_loaded_does_not_wait_for_it(context, platform_paths):
    service = AttestationService()
    with platform_held(platform_paths):
        attestation_early.prestart()
        service.begin(context)
        mount = service.start(context)[0].host
        assert service.follower is not None  # "mounted": the key is still loading
        stopper, _ = _in_thread(service.stop)
        stopper.join(15)
        waited = stopper.is_alive()  # the key is held until after this: a stop waiting for it is still running
    stopper.join(30)
    assert not waited, "stop() waited for the platform key"
    assert str(mount) not in Path("/proc/mounts").read_text()


def test_a_key_failing_after_the_mount_leaves_it_dead_so_no_sandbox_can_bind_it(context, platform_paths, capfd):
    service = AttestationService()
    with platform_held(platform_paths):
        attestation_early.prestart()
        service.begin(context)
        mount = service.start(context)[0].host
        assert service.follower is not None
        key = platform_paths.dir / "pak.pem"
        key.unlink()
        key.mkdir()  # loading it fails with an error that is not "cannot quote"
    try:
        service.follower.join(30)
        with pytest.raises(OSError) as refused:
            os.stat(mount)  # what the launcher (or bwrap) does to bind it: never an empty folder
        assert refused.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    finally:
        service.stop()
    err = capfd.readouterr().err
    assert err.count("the /dev/attestation server failed to start") == 1
    assert "Traceback" not in err
    assert str(mount) not in Path("/proc/mounts").read_text()
