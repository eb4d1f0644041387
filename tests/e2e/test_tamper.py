"""Whatever changes after `cove build` is refused, with one line, before the program starts."""

from __future__ import annotations

import os
import shutil

import pytest

from cove import hostids
from tests.conftest import error_line
from tests.e2e.helpers import make_instance, set_option

MARKER_SCRIPT = "#!/bin/sh\necho started > /out/marker\n"


@pytest.fixture
def app(cove, probe, tmp_path):
    """An instance whose entry program leaves a marker on a writable host mount."""
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, *hostids.enclave_range().host(0, 0))  # the enclave's host user (never host root)
    root = make_instance(
        cove,
        tmp_path,
        probe,
        build=False,
        extra=(f'\n[[mounts]]\ntarget = "/out"\ntype = "host"\nsource = "{out}"\nwritable = true\n'),
    )
    script = root / "image" / "bin" / "start"
    script.write_text(MARKER_SCRIPT)
    script.chmod(0o755)
    cove.ok("build", cwd=root)
    return root


def refused(cove, app, expected: str) -> None:
    marker = app.parent / "out" / "marker"
    result = cove("run", "/bin/start", cwd=app)
    assert result.returncode == 3, result
    assert expected in error_line(result)
    assert not marker.exists(), "the program started although the check failed"


def test_untampered_instance_runs(cove, app):
    cove.ok("run", "/bin/start", cwd=app)
    assert (app.parent / "out" / "marker").read_text() == "started\n"


def test_a_changed_byte_is_refused(cove, app):
    target = app / "image" / "bin" / "probe"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    refused(cove, app, "bin/probe was modified")


def test_an_added_file_is_refused(cove, app):
    (app / "image" / "etc" / "extra").write_text("x")
    refused(cove, app, "etc/extra was added")


def test_a_removed_file_is_refused(cove, app):
    (app / "image" / "bin" / "cat").unlink()
    refused(cove, app, "bin/cat was removed")


def test_a_mode_change_is_refused(cove, app):
    os.chmod(app / "image" / "bin" / "probe", 0o4755)
    refused(cove, app, "bin/probe changed mode")


def test_an_edited_config_is_refused(cove, app):
    set_option(app / "cove.toml", "network", "mode", '"host"')
    refused(cove, app, "cove.toml changed since the build: network.mode")


def test_a_replaced_signature_is_refused(cove, app, tmp_path):
    other = make_instance(cove, tmp_path, name="other")
    shutil.copy(other / "build" / "manifest.sig", app / "build" / "manifest.sig")
    refused(cove, app, "manifest signature is invalid")


def test_a_manifest_signed_with_another_key_fails_a_pinned_signer(cove, app, tmp_path):
    signer = cove.ok("inspect", "--json", cwd=app).stdout
    import json

    expected = json.loads(signer)["signer"]
    cove.ok("keygen", "--out", str(tmp_path / "other.pem"))
    cove.ok("build", "--key", str(tmp_path / "other.pem"), cwd=app)
    result = cove("run", "--signer", expected, "/bin/start", cwd=app)
    assert result.returncode == 3
    assert "not the expected signer" in error_line(result)
    assert not (app.parent / "out" / "marker").exists()


def test_a_changed_listing_is_refused(cove, app):
    tree = app / "build" / "image.tree"
    data = bytearray(tree.read_bytes())
    data[-1] ^= 0x01
    tree.write_bytes(bytes(data))
    refused(cove, app, "image.tree")


def test_a_swapped_manifest_is_refused(cove, app):
    manifest = app / "build" / "manifest.cbor"
    data = bytearray(manifest.read_bytes())
    data[10] ^= 0x01
    manifest.write_bytes(bytes(data))
    refused(cove, app, "manifest signature is invalid")


def test_a_file_replaced_by_a_symlink_is_refused(cove, app):
    target = app / "image" / "bin" / "cat"
    target.unlink()
    target.symlink_to("/etc/shadow")
    refused(cove, app, "bin/cat changed type")
