"""`cove build --encrypt-image`: code confidential at rest, decrypted only for the running enclave.

Real `cove` commands end to end: the build encrypts the image next to the
manifest, `cove run` serves the enclave from the ciphertext through a
verifying FUSE root (the plain image/ folder is moved away first, so a run
that still read it would fail), and `cove package` ships only ciphertext.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.conftest import error_line, require
from tests.e2e.helpers import make_instance
from tests.e2e.test_kbs_provisioning import (  # noqa: F401 (fixtures)
    broker,
    platform_env,
    release_to,
    secrets_config,
)

SECRET_TEXT = "code and configuration nobody may read at rest"
READ_SECRET = ("/bin/sh", "-c", "cat /etc/app/secret.conf; ls /scratch >/dev/null && echo scratch-ok")
SCRATCH = '\n[[mounts]]\ntarget = "/scratch"\ntype = "tmpfs"\n'


@pytest.fixture
def app(cove, tmp_path):
    require("fusermount3")
    root = make_instance(cove, tmp_path, build=False, extra=SCRATCH)
    (root / "image" / "etc" / "app").mkdir(parents=True)
    (root / "image" / "etc" / "app" / "secret.conf").write_text(SECRET_TEXT + "\n")
    return root


def hide_plain_image(root: Path) -> Path:
    """Move image/ away: what runs must come from build/image.enc alone."""
    away = root.parent / f"{root.name}-plain-image"
    shutil.move(root / "image", away)
    return away


def ciphertext(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_encrypted_build_keeps_the_measurement_and_runs_from_ciphertext(cove, app, platform_env):
    plain = cove.ok("build", cwd=app, env=platform_env).stdout
    built = cove.ok("build", "--encrypt-image", "seal:mrsigner", cwd=app, env=platform_env).stdout
    assert plain.splitlines()[0] == built.splitlines()[0]  # same measurement line
    assert "encrypted   build/image.enc, opened with seal:mrsigner" in built
    assert (app / "build" / "image.key").read_text() == "seal:mrsigner\n"
    blob = ciphertext(app / "build" / "image.enc")
    assert SECRET_TEXT.encode() not in blob and b"secret.conf" not in blob
    assert (app / "image" / "bin" / "sh").read_bytes()[4096:8192] not in blob
    hide_plain_image(app)
    result = cove.ok("run", *READ_SECRET, cwd=app, env=platform_env)
    assert result.stdout.splitlines() == [SECRET_TEXT, "scratch-ok"]
    # the root is read-only and nothing plain was left on the host
    result = cove("run", "/bin/sh", "-c", "echo x > /etc/app/new", cwd=app, env=platform_env)
    assert result.returncode != 0


def test_a_plain_build_drops_the_encrypted_copy(cove, app, platform_env):
    cove.ok("build", "--encrypt-image", "seal:mrenclave", cwd=app, env=platform_env)
    cove.ok("build", cwd=app, env=platform_env)
    assert not (app / "build" / "image.enc").exists() and not (app / "build" / "image.key").exists()
    assert cove.ok("run", *READ_SECRET, cwd=app, env=platform_env).stdout.startswith(SECRET_TEXT)


def test_tampered_ciphertext_never_runs(cove, app, platform_env):
    cove.ok("build", "--encrypt-image", "seal:mrsigner", cwd=app, env=platform_env)
    hide_plain_image(app)
    victim = largest_file(app / "build" / "image.enc")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    result = cove("run", *READ_SECRET, cwd=app, env=platform_env)
    assert result.returncode != 0
    assert SECRET_TEXT not in result.stdout


def test_a_metadata_byte_flipped_is_refused_before_launch(cove, app, platform_env):
    cove.ok("build", "--encrypt-image", "seal:mrsigner", cwd=app, env=platform_env)
    hide_plain_image(app)
    for path in sorted((app / "build" / "image.enc").rglob("*")):
        if path.is_file() and path.stat().st_size:
            data = bytearray(path.read_bytes())
            data[-1] ^= 0x80
            path.write_bytes(bytes(data))
    result = cove("run", *READ_SECRET, cwd=app, env=platform_env)
    assert result.returncode != 0
    assert SECRET_TEXT not in result.stdout
    error_line(result)


def test_another_key_source_cannot_open_the_image(cove, app, platform_env):
    cove.ok("build", "--encrypt-image", "seal:mrsigner", cwd=app, env=platform_env)
    (app / "build" / "image.key").write_text("seal:mrenclave\n")
    result = cove("run", *READ_SECRET, cwd=app, env=platform_env)
    assert result.returncode != 0
    assert "seal:mrsigner" in error_line(result)


def test_another_platform_cannot_open_a_sealed_image(cove, app, platform_env, tmp_path):
    cove.ok("build", "--encrypt-image", "seal:mrsigner", cwd=app, env=platform_env)
    other = tmp_path / "other-platform"
    other.mkdir(mode=0o700)
    result = cove("run", *READ_SECRET, cwd=app, env={"COVE_PLATFORM_DIR": str(other)})
    assert result.returncode != 0
    assert SECRET_TEXT not in result.stdout
    error_line(result)


def test_insecure_keys_are_refused_for_a_release_enclave(cove, app, platform_env):
    result = cove("build", "--encrypt-image", "insecure:" + "11" * 16, cwd=app, env=platform_env)
    assert result.returncode != 0
    assert "debug enclaves only" in error_line(result)
    assert not (app / "build" / "manifest.cbor").exists() and not (app / "build" / "image.enc").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (("--encrypt-image", "seal:other"), "seal:"),
        (("--image-key-file", "key.bin"), "--encrypt-image"),
    ],
)
def test_bad_encryption_options_get_one_line(cove, app, platform_env, args, expected):
    result = cove("build", *args, cwd=app, env=platform_env)
    assert result.returncode != 0
    assert expected in error_line(result)
    assert not (app / "build" / "image.enc").exists()


def test_kbs_image_key_needs_attestation(cove, app, platform_env):
    (app / "key.bin").write_bytes(os.urandom(16))
    result = cove(
        "build", "--encrypt-image", "kbs:app/image/key", "--image-key-file", "key.bin", cwd=app, env=platform_env
    )
    assert result.returncode != 0
    assert "[attestation]" in error_line(result)


def test_a_file_key_builds_and_runs_and_the_wrong_file_fails(cove, app, platform_env):
    key = app.parent / "image-key.bin"
    key.write_bytes(os.urandom(16))
    cove.ok("build", "--encrypt-image", f"file:{key}", cwd=app, env=platform_env)
    hide_plain_image(app)
    assert cove.ok("run", *READ_SECRET, cwd=app, env=platform_env).stdout.startswith(SECRET_TEXT)
    key.write_bytes(os.urandom(16))
    result = cove("run", *READ_SECRET, cwd=app, env=platform_env)
    assert result.returncode != 0
    assert SECRET_TEXT not in result.stdout
    error_line(result)


def test_the_package_ships_only_ciphertext_and_runs(cove, app, platform_env, tmp_path):
    cove.ok("build", "--encrypt-image", "seal:mrsigner", cwd=app, env=platform_env)
    out = tmp_path / "app.tar.gz"
    cove.ok("package", str(out), cwd=app, env=platform_env)
    with tarfile.open(out) as archive:
        names = archive.getnames()
        payload = b"".join(archive.extractfile(m).read() for m in archive.getmembers() if m.isfile())
    assert not any(n == "image" or n.startswith("image/") for n in names)
    assert "build/image.key" in names and any(n.startswith("build/image.enc/") for n in names)
    assert SECRET_TEXT.encode() not in payload
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    inspected = json.loads(cove.ok("inspect", "--json", str(out), cwd=tmp_path).stdout)
    assert inspected["mounts"][0] == {
        "target": "/",
        "type": "encrypted-image",
        "writable": False,
        "key": "seal:mrsigner",
    }
    assert "encrypted-image ro (key seal:mrsigner)" in cove.ok("inspect", cwd=app).stdout
    shutil.rmtree(app)
    result = cove.ok("run", "--package", str(out), *READ_SECRET, cwd=tmp_path, env=platform_env)
    assert result.stdout.splitlines() == [SECRET_TEXT, "scratch-ok"]
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest


def test_a_kbs_image_key_is_released_only_after_attestation(cove, tmp_path, broker, platform_env):  # noqa: F811
    require("fusermount3")
    extra = SCRATCH + f'\n[attestation]\nkbs = "{broker.url}"\nca = "{broker.ca}"\nretries = 0\n'
    root = make_instance(cove, tmp_path, build=False, extra=extra)
    (root / "image" / "etc" / "app").mkdir(parents=True)
    (root / "image" / "etc" / "app" / "secret.conf").write_text(SECRET_TEXT + "\n")
    missing = cove("build", "--encrypt-image", "kbs:app/image/key", cwd=root, env=platform_env)
    assert missing.returncode != 0 and "--image-key-file" in error_line(missing)
    key = tmp_path / "image-key.bin"
    key.write_bytes(os.urandom(16))
    cove.ok("build", "--encrypt-image", "kbs:app/image/key", "--image-key-file", str(key), cwd=root, env=platform_env)
    hide_plain_image(root)
    broker.admin.put_policy(
        "other", 'types = ["cove"]\n[cove]\nmeasurements = ["' + "00" * 32 + '"]\nself_certified = true\n'
    )
    broker.admin.create_secret("app/image/key", "data", "other", value=key.read_bytes())
    denied = cove("run", *READ_SECRET, cwd=root, env=platform_env)
    assert denied.returncode != 0 and SECRET_TEXT not in denied.stdout
    assert "PolicyDeny" in error_line(denied)
    release_to(broker, root)
    broker.admin.set_secret_policy("app/image/key", "app")
    result = cove.ok("run", *READ_SECRET, cwd=root, env=platform_env)
    assert result.stdout.splitlines() == [SECRET_TEXT, "scratch-ok"]
    releases = [r for r in broker.admin.audit(action="release") if r["outcome"] == "ok"]
    assert [r["resource"] for r in releases] == ["app/image/key@1"]


def test_provisioned_secrets_reach_a_program_on_an_encrypted_root(cove, tmp_path, broker, platform_env):  # noqa: F811
    """File and env secrets still land when the root is the read-only decrypting view."""
    require("fusermount3")
    root = make_instance(cove, tmp_path, build=False, extra=secrets_config(broker.url, broker.ca))
    cove.ok("build", "--encrypt-image", "seal:mrsigner", cwd=root, env=platform_env)
    hide_plain_image(root)
    release_to(broker, root)
    broker.admin.create_secret("app/db/password", "data", "app", value=b"correct horse")
    broker.admin.create_secret("app/api/token", "data", "app", value=b"token-1")
    result = cove.ok("run", "/bin/sh", "-c", 'cat /run/secrets/db; echo; echo "$API_TOKEN"', cwd=root, env=platform_env)
    assert result.stdout.splitlines() == ["correct horse", "token-1"]
