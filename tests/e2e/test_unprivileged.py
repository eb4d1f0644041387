"""Cove started by root and by an unprivileged user: the secure FS and attestation work for both.

The sandbox probes run for both in test_isolation.py; here an encrypted mount
round trip, a quote that `cove verify` accepts, and a writable host mount the
enclave's host user may not write, each as root and as the test account
(tests/conftest.py: user_cove, whoever).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from cove import hostids
from tests.conftest import ROOT, error_line, require
from tests.e2e.helpers import make_instance


def _own(who, *paths) -> None:
    for path in paths:
        os.chown(path, getattr(who, "uid", 0), getattr(who, "gid", 0))


@pytest.fixture(scope="module")
def attester(whoever):
    """An instance with the attestation probe and an encrypted, writable /data."""
    require("gcc")
    who, parent, _ = whoever
    probe = parent / "attest_probe"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(probe), str(ROOT / "tests" / "e2e" / "attest_probe.c")], check=True
    )
    _own(who, probe)
    root = make_instance(
        who,
        parent,
        name="attester",
        build=False,
        extra='\n[[mounts]]\ntarget = "/data"\ntype = "encrypted"\nkey = "seal:mrenclave"\nwritable = true\n',
    )
    who.ok("add", "--to", "/bin", probe, cwd=root)
    who.ok("build", cwd=root)
    return who, root, parent


def test_an_encrypted_mount_round_trip(attester):
    who, root, _ = attester
    who.ok("run", "/bin/sh", "-c", "echo kept-in-the-volume > /data/f", cwd=root)
    assert who.ok("run", "/bin/cat", "/data/f", cwd=root).stdout == "kept-in-the-volume\n"
    listing = who.ok("run", "/bin/ls", "-ln", "/data", cwd=root).stdout.split()
    assert listing[4:6] == ["0", "0"], listing  # the enclave's own file, as the enclave's user
    stored = [os.path.join(d, n) for d, _, names in os.walk(root / "run") for n in names]
    assert stored and not any(b"kept-in-the-volume" in open(p, "rb").read() for p in stored)


def test_a_quote_verifies(attester):
    who, root, parent = attester
    nonce = os.urandom(32)
    evidence = parent / f"evidence-{os.getpid()}.hex"
    evidence.write_text(who.ok("run", "/bin/attest_probe", "quote", nonce.hex(), cwd=root).stdout.strip())
    measurement = who.ok("inspect", "--json", cwd=root).stdout.split('"measurement": "')[1][:64]
    policy = parent / "policy.toml"
    policy.write_text(f'[cove]\nself_certified = true\nmeasurements = ["{measurement}"]\n')
    result = who("verify", evidence, "--nonce", nonce.hex(), "--policy", policy)
    assert result.returncode == 0, result.stderr
    assert f"measurement: {measurement}" in result.stdout


def test_a_writable_host_mount_the_enclave_may_not_write_is_refused(whoever):
    who, parent, probe = whoever
    shared = parent / "root-owned"
    shared.mkdir(mode=0o755)  # root's, as made by this test (running as root)
    root = make_instance(
        who,
        parent,
        probe,
        name="hostmount",
        extra=(f'\n[[mounts]]\ntarget = "/out"\ntype = "host"\nsource = "{shared}"\nwritable = true\n'),
    )
    result = who("run", "/bin/sh", "-c", "echo x > /out/f", cwd=root)
    line = error_line(result)
    assert result.returncode == 2 and "is not writable by the enclave's host user" in line, line
    uid = getattr(who, "uid", 0)
    host_uid = hostids.root_range().uid if uid == 0 else uid
    assert f"chown {host_uid}:" in line
    assert not (shared / "f").exists()


def test_root_without_an_id_range_refuses_to_start(cove, probe, tmp_path):
    root = make_instance(cove, tmp_path, probe)
    result = cove("run", "/bin/probe", "exit", "0", cwd=root, env={hostids.ENVIRONMENT: "0:65536"})
    assert result.returncode == 4 and "must start above 0" in error_line(result)
