"""Encrypted root images: encrypted at build, served as a verifying read-only root to a sandbox."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cove.errors import IntegrityError
from cove.fs import encrypted_image, keys
from cove.fs.access import Identity
from cove.fs.server_process import MountError
from cove.fs.volume import Volume
from cove.image import artifacts
from cove.runtime.backend import EnclaveIdentity, LaunchSpec
from cove.runtime.enclave_services import Bind
from cove.runtime.sim import SimBackend
from tests.conftest import require
from tests.e2e.helpers import make_instance

from securefs_helpers import flip, host_files


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("COVE_PLATFORM_DIR", str(tmp_path / "platform"))
    return {"COVE_PLATFORM_DIR": str(tmp_path / "platform")}


@pytest.fixture
def built(cove, tmp_path, env):
    require("fusermount3")
    app = make_instance(cove, tmp_path, build=False)
    (app / "image" / "etc").mkdir(exist_ok=True)
    (app / "image" / "etc" / "secret.conf").write_text("code and config nobody may read at rest\n")
    os.symlink("secret.conf", app / "image" / "etc" / "link.conf")
    cove.ok("build", cwd=app, env=env)
    verified = artifacts.load_verified(app / "build", app / "cove.toml")
    enclave = verified.config.enclave
    identity = EnclaveIdentity(
        enclave.name, verified.measurement, verified.signer, enclave.product_id, enclave.svn, enclave.debug
    )
    return app, verified, identity


def _encrypt(app, verified, identity, key="seal:mrsigner") -> Path:
    out = app / "build" / "image.enc"
    files, size = encrypted_image.encrypt_image(app / "image", out, key, identity, verified.entries)
    assert files == sum(1 for e in verified.entries if e.type == "f")
    assert size == sum(e.size for e in verified.entries if e.type == "f")
    return out


def test_encrypted_image_holds_no_plain_bytes(built):
    app, verified, identity = built
    out = _encrypt(app, verified, identity)
    blob = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert b"nobody may read" not in blob and b"secret.conf" not in blob
    assert (app / "image" / "bin" / "sh").read_bytes()[:4096] not in blob


def test_a_sandbox_runs_from_the_encrypted_root(built, tmp_path):
    app, verified, identity = built
    out = _encrypt(app, verified, identity)
    secret = tmp_path / "provisioned"
    secret.write_text("from a service\n")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "f").write_text("in a bound folder\n")
    with encrypted_image.ImageMount(
        out,
        "seal:mrsigner",
        identity,
        verified.entries,
        tmp_path / "root",
        ["proc", "dev", "tmp", "srv/shared"],
        ["run/secrets/token"],
    ) as root:
        binds = (Bind(secret, "/run/secrets/token"), Bind(tmp_path / "shared", "/srv/shared"))
        spec = LaunchSpec(
            identity=identity,
            config=verified.config,
            root=root,
            argv=(
                "/bin/sh",
                "-c",
                "read line < /etc/link.conf; "
                "[ \"$line\" = 'code and config nobody may read at rest' ] && [ -d /proc/1 ] "
                "&& ! ( : > /etc/new ) 2>/dev/null && read t < /run/secrets/token && "
                "[ \"$t\" = 'from a service' ] && read s < /srv/shared/f && "
                "[ \"$s\" = 'in a bound folder' ]",
            ),
            env={"PATH": "/bin:/usr/bin"},
            uid=0,
            gid=0,
            instance_id="t",
            binds=binds,
        )
        enclave = SimBackend().launch(spec)
        try:
            code = enclave.wait()
        finally:
            enclave.stop()
        assert code == 0
    assert not os.path.ismount(tmp_path / "root")


def test_a_changed_file_answers_eio_and_a_changed_listing_refuses_to_mount(built, tmp_path):
    app, verified, identity = built
    out = _encrypt(app, verified, identity)
    # a file whose encrypted bytes were changed: its MAC fails
    target = next(p for p in host_files(out).values() if p.stat().st_size > 8192)
    flip(target, 3 * 4096 + 9)
    with encrypted_image.ImageMount(
        out, "seal:mrsigner", identity, verified.entries, tmp_path / "root", ["proc", "dev", "tmp"]
    ) as root:
        failures = 0
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                try:
                    path.read_bytes()
                except OSError as exc:
                    assert exc.errno == 5
                    failures += 1
        assert failures == 1
    # a listing that differs from the signed one (here: the signed listing of a changed image)
    (app / "image" / "etc" / "secret.conf").write_text("other")
    changed = [
        e if e.path != "etc/secret.conf" else e.__class__(e.path, e.type, e.mode, 5, b"\0" * 32)
        for e in verified.entries
    ]
    with pytest.raises(MountError, match="differs from the signed listing: etc/secret.conf differs"):
        encrypted_image.ImageMount(out, "seal:mrsigner", identity, changed, tmp_path / "root2", ["proc"]).start()


def test_content_that_differs_from_the_signed_digest_answers_eio(built, tmp_path):
    app, verified, identity = built
    out = _encrypt(app, verified, identity)
    # re-encrypt one file with the right key but other content of the same size: MACs pass, digest fails
    with Volume.open(out, lambda policy: keys.resolve("seal:mrsigner", Identity.of(identity), policy.svn)) as volume:
        node = volume.resolve("/etc/secret.conf")
        volume.acquire(node)
        volume.write(node, 0, b"X")
        volume.release(node)
    with encrypted_image.ImageMount(
        out, "seal:mrsigner", identity, verified.entries, tmp_path / "root", ["proc"]
    ) as root:
        with pytest.raises(OSError) as caught:
            (root / "etc" / "secret.conf").read_bytes()
        assert caught.value.errno == 5
        assert (root / "bin" / "sh").read_bytes() == (app / "image" / "bin" / "sh").read_bytes()


def test_a_file_changed_during_encryption_stops_the_build(built):
    app, verified, identity = built
    (app / "image" / "etc" / "secret.conf").write_text("changed after measuring")
    with pytest.raises(IntegrityError, match="etc/secret.conf changed while the image was being encrypted"):
        _encrypt(app, verified, identity)
    assert not (app / "build" / "image.enc").exists()


def test_another_enclave_cannot_decrypt_and_the_fallback_copy_is_verified(built, tmp_path):
    app, verified, identity = built
    out = _encrypt(app, verified, identity, key="seal:mrenclave")
    other = EnclaveIdentity("x", b"\x07" * 32, identity.signer, identity.product_id, identity.svn, identity.debug)
    with pytest.raises(Exception, match="the key does not open this volume"):
        encrypted_image.decrypt_image(out, "seal:mrenclave", other, verified.entries, tmp_path / "plain")
    copy = encrypted_image.decrypt_image(out, "seal:mrenclave", identity, verified.entries, tmp_path / "plain")
    assert (copy / "etc" / "secret.conf").read_text() == "code and config nobody may read at rest\n"
    shutil.rmtree(copy)


def test_the_server_decodes_the_signed_listing_as_the_image_layer_encodes_it():
    """fs.encrypted_image.decode_listing reads image.tree's entry encoding, so fs.server needs no import from image."""
    from cove.image.tree import Entry, encode_entries
    import cbor2

    entries = [Entry("a", "f", 0o644, 3, b"\x01" * 32), Entry("d", "d", 0o755, 7), Entry("l", "l", 0o777, 0, b"", "a")]
    assert encrypted_image.decode_listing(encode_entries(entries)) == encrypted_image.listing_of(entries)
    for hostile, problem in [
        (cbor2.dumps([["a", "f", 0o644, 3, b""]]), "entry 0 must be a list of six items"),
        (encode_entries(entries) + b"\x00", "1 trailing bytes"),
        (cbor2.dumps({"a": 1}), "must be a list"),
        (cbor2.dumps([["a", "f", "0644", 3, b"", ""]]), "entry 0 mode must be an integer"),
        (b"\x81" * 1000 + b"\x80", "not valid CBOR"),
    ]:
        with pytest.raises(IntegrityError, match=problem):
            encrypted_image.decode_listing(hostile)
