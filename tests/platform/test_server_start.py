"""The per-run /dev/attestation server's path to the platform key: what it loads, and the runtime hash's cache.

Every direct `cove run` starts that server, so its start is part of every run (docs/node.md, "What a start
costs"): a self-certified platform's key loads without x509, the TPM tools or swtpm, and the runtime hash reads
only the package files whose stat changed since the platform folder's cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from cove.platform import monitor
from cove.platform.runtime_measurement import CACHE_NAME, PACKAGE, measure, measure_cached

# Only a TPM-rooted platform, a stale endorsement or `cove platform` needs these.
SERVER_AVOIDS = (
    "cryptography.x509",
    "cove.platform.tpm2",
    "cove.platform.swtpm",
    "cove.attest.ak_ca",
    "cove.attest.tpm_structs",
    "tomllib",  # the server reads JSON and CBOR only (cove.decode loads tomllib for decode_toml alone)
)
SERVER_PATH = """
import sys
from cove.platform import devattest_server
signer, why = devattest_server.platform_signer()
assert signer is not None, why
print(' '.join(sorted(sys.modules)))
"""


def test_server_loads_a_self_certified_key_without_x509_or_tpm(platform_paths):
    monitor.signer(platform_paths)  # the platform exists, its endorsement current: what a run finds
    out = subprocess.run(
        [sys.executable, "-c", SERVER_PATH], capture_output=True, text=True, check=True, env=dict(os.environ)
    ).stdout.split()
    assert "cove.platform.monitor" in out and "cove.platform.runtime_measurement" in out
    loaded = [m for m in out if any(m == name or m.startswith(name + ".") for name in SERVER_AVOIDS)]
    assert loaded == [], loaded


@pytest.fixture
def package(tmp_path):
    """A small package and a root-only folder for the cache."""
    pkg = tmp_path / "cove"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("a = 1\n")
    (pkg / "sub" / "b.py").write_text("b = 2\n")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"compiled")
    folder = tmp_path / "platform"
    folder.mkdir(mode=0o700)
    return pkg, folder


def _cached_files(folder) -> list[str]:
    return json.loads((folder / CACHE_NAME).read_text())["files"]


def test_cache_keeps_the_hash_and_follows_every_change(package):
    pkg, folder = package
    base = measure(pkg)
    assert measure_cached(folder, pkg) == base
    assert _cached_files(folder) == []  # files changed within RACY_NS are read again, not cached
    time.sleep(1.1)
    assert measure_cached(folder, pkg) == base
    assert len(_cached_files(folder)) == 2 and oct((folder / CACHE_NAME).stat().st_mode)[-3:] == "600"
    assert measure_cached(folder, pkg) == base  # from the cache

    # a new mtime alone: the file is read again, the hash stays
    os.utime(pkg / "a.py", ns=(1, 1))
    assert measure_cached(folder, pkg) == base

    # new content of the same size with the old mtime restored: the ctime moved, so the file is read again
    b = pkg / "sub" / "b.py"
    st = b.stat()
    b.write_text("b = 3\n")
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert b.stat().st_size == st.st_size and b.stat().st_mtime_ns == st.st_mtime_ns
    changed = measure_cached(folder, pkg)
    assert changed != base and changed == measure(pkg)

    # a renamed file, a new file, a removed file
    b.rename(pkg / "sub" / "c.py")
    assert measure_cached(folder, pkg) == measure(pkg) != changed
    (pkg / "new.py").write_text("")
    assert measure_cached(folder, pkg) == measure(pkg)
    (pkg / "new.py").unlink()
    assert measure_cached(folder, pkg) == measure(pkg)
    # a compiled cache is still left out
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"recompiled")
    assert measure_cached(folder, pkg) == measure(pkg)


@pytest.mark.parametrize(
    "document",
    [
        b"\xff not json",
        b"[]",
        json.dumps({"version": 2, "package": "", "files": []}).encode(),
        json.dumps({"version": 1, "package": "/elsewhere", "files": []}).encode(),
        json.dumps({"version": 1, "package": "PKG", "files": ["zz" * 32 + " 1 2 3 4 5 a.py"]}).encode(),
        json.dumps({"version": 1, "package": "PKG", "files": [7]}).encode(),
        b"{" * 100000,
        b"[" + b" " * (1 << 20) + b"]",  # past CACHE_LIMIT
    ],
)
def test_damaged_cache_is_measured_again(package, document):
    pkg, folder = package
    (folder / CACHE_NAME).write_bytes(document.replace(b"PKG", str(pkg).encode()))
    assert measure_cached(folder, pkg) == measure(pkg)
    assert json.loads((folder / CACHE_NAME).read_text())["version"] == 1  # rewritten whole


def test_cache_outside_a_root_only_folder_is_not_believed(package):
    """A folder others can write could hold a forged digest for a changed file: it is neither read nor written."""
    pkg, folder = package
    st = os.stat(pkg / "a.py")
    forged = f"{'00' * 32} {st.st_size} {st.st_mtime_ns} {st.st_ino} {st.st_ctime_ns} {st.st_dev} a.py"
    (folder / CACHE_NAME).write_text(json.dumps({"version": 1, "package": str(pkg), "files": [forged]}))
    os.chmod(folder, 0o777)
    assert measure_cached(folder, pkg) == measure(pkg)
    assert _cached_files(folder) == [forged]


def test_installed_package_through_the_cache(tmp_path):
    folder = tmp_path / "platform"
    folder.mkdir(mode=0o700)
    assert measure_cached(folder) == measure_cached(folder) == measure(PACKAGE)
    assert (folder / CACHE_NAME).exists()


def test_a_sim_run_chooses_its_backend_without_loading_the_vm_backend():
    """`launch.choose-backend` of a `sim` (or an `auto`) enclave imports the sim backend only, where sim can run;
    `cove info` still lists them all, and the order auto tries them in is the order of their strength."""
    code = (
        "import sys\n"
        "from cove.runtime import backend\n"
        "print(backend.choose('sim').name, backend.choose('auto').name, 'cove.runtime.vm' in sys.modules)\n"
        "strengths = [c.strength for c in backend.registry().values()]\n"
        "print(list(backend.registry()) == list(backend.NAMES), strengths == sorted(strengths, reverse=True))\n"
        "print(backend.backend_class('vm').name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["sim sim False", "True True", "vm"]
