"""The platform without a TPM: a self-certified key, made on first use, renewed with the runtime."""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timezone

import pytest

from cove.attest import evidence as ev
from cove.attest.cove_evidence_verify import verify_cove_evidence
from cove.errors import CoveError
from cove.platform import endorse, monitor, pak
from cove.platform.reports import EnclaveClaims
from cove.platform.runtime_measurement import measure, runtime_hash
from tests.conftest import error_line

CLAIMS = EnclaveClaims(b"\x01" * 32, b"\x02" * 32, 1, 1, False, "sim", "namespaces+seccomp", "feedfacefeedface")


def test_first_use_makes_a_self_certified_platform(platform_paths):
    assert not platform_paths.config.exists()
    signer = monitor.signer(platform_paths)
    assert signer.root == "self-certified"
    assert stat.S_IMODE(os.stat(platform_paths.pak).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(platform_paths.dir).st_mode) == 0o700
    claims = verify_cove_evidence(signer.evidence(CLAIMS, bytes(64)), datetime.now(timezone.utc))
    assert claims.root == "self-certified" and claims.report.root == "self-certified"
    assert claims.runtime == runtime_hash()
    again = monitor.signer(platform_paths)
    assert again.platform_key == signer.platform_key and again.endorsement.epoch == signer.endorsement.epoch


def test_every_report_says_self_certified(platform_paths):
    evidence = monitor.signer(platform_paths).evidence(CLAIMS, bytes(64))
    parsed = ev.parse_evidence(evidence)
    assert parsed.report.root == "self-certified" and parsed.endorsement.tpm is None


def test_a_changed_runtime_opens_a_new_epoch(platform_paths):
    signer = monitor.signer(platform_paths)
    stored = endorse.load(platform_paths)
    endorse.save(
        platform_paths,
        ev.Endorsement(
            root=stored.root,
            pak=stored.pak,
            runtime=b"\xee" * 32,
            epoch=stored.epoch,
            epoch_start_ms=stored.epoch_start_ms,
        ),
    )
    assert monitor.status(platform_paths)["current"] is False
    renewed = monitor.signer(platform_paths)
    assert renewed.endorsement.runtime == runtime_hash() and renewed.endorsement.epoch != signer.endorsement.epoch


def test_init_no_tpm_and_rotate(platform_paths):
    first = monitor.init(monitor.InitOptions(tpm="none"), platform_paths)
    assert first["root"] == "self-certified" and first["current"]
    kept = monitor.init(monitor.InitOptions(tpm="none"), platform_paths)
    assert kept["platform_key"] == first["platform_key"] and kept["epoch"] != first["epoch"]
    rotated = monitor.init(monitor.InitOptions(tpm="none", rotate=True), platform_paths)
    assert rotated["platform_key"] != first["platform_key"]


def test_damaged_key_is_a_clear_error(platform_paths):
    monitor.signer(platform_paths)
    platform_paths.pak.write_bytes(b"not a key")
    with pytest.raises(CoveError, match="platform key is damaged"):
        monitor.signer(platform_paths)
    other = pak.generate()
    pak.save(platform_paths, other, None)
    platform_paths.pak_public.write_bytes(pak.spki(pak.generate()))
    with pytest.raises(CoveError, match="does not match its public key"):
        pak.load(platform_paths, None)


def test_runtime_hash_covers_every_package_file(tmp_path):
    pkg = tmp_path / "cove"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("a = 1\n")
    (pkg / "sub" / "b.py").write_text("b = 2\n")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"compiled")
    base = measure(pkg)
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"recompiled")
    assert measure(pkg) == base
    (pkg / "sub" / "b.py").write_text("b = 3\n")
    assert measure(pkg) != base
    (pkg / "sub" / "b.py").write_text("b = 2\n")
    (pkg / "sub" / "b.py").rename(pkg / "sub" / "c.py")
    assert measure(pkg) != base


def test_cli_platform_init_status(cove, tmp_path):
    env = {"COVE_PLATFORM_DIR": str(tmp_path / "p")}
    assert "not initialized" in cove.ok("platform", "status", env=env).stdout
    out = cove.ok("platform", "init", "--no-tpm", env=env).stdout
    assert "self-certified" in out and "platform_key" in out
    state = json.loads(cove.ok("platform", "status", "--json", env=env).stdout)
    assert state["root"] == "self-certified" and state["current"] is True
    assert "tpm" not in state
    bad = cove("platform", "init", "--swtpm", "--no-tpm", env=env)
    assert bad.returncode != 0 and "exclude each other" in error_line(bad)
    assert "no swtpm was running" in cove.ok("platform", "stop", env=env).stdout


def test_cli_unwritable_platform_folder_is_one_line(cove, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = cove("platform", "init", "--no-tpm", env={"COVE_PLATFORM_DIR": str(blocker / "sub")})
    assert result.returncode != 0
    assert "cannot create the platform folder" in error_line(result)
