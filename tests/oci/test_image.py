"""`cove package --oci`: an OCI image carrying the signed enclave, reproducible, read by real engines."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile

import pytest

from tests.conftest import error_line, require


def layout(folder):
    index = json.loads((folder / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    manifest = json.loads((folder / "blobs" / "sha256" / digest[7:]).read_bytes())
    return index, manifest


def layer_names(folder, manifest):
    with tarfile.open(folder / "blobs" / "sha256" / manifest["layers"][0]["digest"][7:]) as layer:
        return {m.name: m for m in layer.getmembers()}


def test_layout_carries_the_signed_build_and_annotations(cove, oci_instance, tmp_path):
    out = tmp_path / "layout"
    line = cove.ok("package", "--oci", "-o", str(out), cwd=oci_instance).stdout
    inspected = json.loads(cove.ok("inspect", "--json", cwd=oci_instance).stdout)
    index, manifest = layout(out)
    assert json.loads((out / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "latest"
    assert index["manifests"][0]["digest"] in line
    notes = manifest["annotations"]
    assert notes["cove.dev/measurement"] == inspected["measurement"]
    assert notes["cove.dev/signer"] == inspected["signer"]
    assert notes["cove.dev/encrypted-root"] == "false"
    members = layer_names(out, manifest)
    for name in (".cove/manifest.cbor", ".cove/manifest.sig", ".cove/image.tree", ".cove/cove.toml", "bin/sh"):
        assert name in members
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members.values())
    assert members[".cove/manifest.cbor"].size == (oci_instance / "build" / "manifest.cbor").stat().st_size
    for blob in (out / "blobs" / "sha256").iterdir():  # content-addressed
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


def test_same_instance_same_digest_even_from_a_copy(cove, oci_instance, oci_tar, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(oci_instance, copy, symlinks=True)  # new inodes, mtimes and order on disk
    (copy / "image" / "bin" / "cat").touch()
    again = tmp_path / "again.oci.tar"
    cove.ok("package", "--oci", "--tag", "cove-test/hello:1", "-o", str(again), cwd=copy)
    assert again.read_bytes() == oci_tar.read_bytes()


def test_tampered_image_is_not_packaged(cove, oci_instance, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(oci_instance, copy, symlinks=True)
    (copy / "image" / "bin" / "cat").write_bytes(b"#!/bin/sh\necho evil\n")
    out = tmp_path / "bad.oci.tar"
    result = cove("package", "--oci", "-o", str(out), cwd=copy)
    assert result.returncode == 3 and "bin/cat" in error_line(result)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["copy"]  # nothing half-written


@pytest.mark.parametrize("args, word", [(["--tag", "Bad Name:1"], "--tag"), (["--tag", "x:1"], "--oci")])
def test_bad_options(cove, oci_instance, tmp_path, args, word):
    extra = ["--oci"] if word == "--tag" else []
    result = cove("package", *extra, *args, "-o", str(tmp_path / "x.tar"), cwd=oci_instance)
    assert result.returncode == 2 and word in error_line(result)


def test_encrypted_root_ships_as_ciphertext(cove, tmp_path):
    from tests.e2e.helpers import make_instance

    app = make_instance(cove, tmp_path, name="secret", build=False)
    (app / "image" / "etc" / "secret.conf").write_text("the-plain-secret-text\n")
    key = tmp_path / "image.key"
    key.write_bytes(bytes(range(16)))
    cove.ok("build", "--encrypt-image", f"file:{key}", cwd=app)
    out = tmp_path / "enc"
    cove.ok("package", "--oci", "-o", str(out), cwd=app)
    _, manifest = layout(out)
    assert manifest["annotations"]["cove.dev/encrypted-root"] == "true"
    members = layer_names(out, manifest)
    assert ".cove/image.key" in members and ".cove/image.enc" in members
    assert not any(n == "etc" or n.startswith(("etc/", "bin/")) for n in members)
    blob = (out / "blobs" / "sha256" / manifest["layers"][0]["digest"][7:]).read_bytes()
    assert b"the-plain-secret-text" not in blob


def test_podman_loads_it(oci_tar):
    podman = require("podman")
    loaded = subprocess.run(
        [podman, "--cgroup-manager=cgroupfs", "load", "-i", str(oci_tar)], capture_output=True, text=True, timeout=120
    )
    assert loaded.returncode == 0, loaded.stderr
    labels = json.loads(
        subprocess.run(
            [podman, "image", "inspect", "localhost/cove-test/hello:1", "--format", "{{json .Labels}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert len(labels["cove.dev/measurement"]) == 64
