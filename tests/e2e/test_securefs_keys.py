"""Volume keys inside enclaves: sealing to a measurement or a signer, svn rules, key sources."""

from __future__ import annotations

import os

import pytest

from tests.conftest import error_line, require
from tests.e2e.helpers import make_instance, set_option
from tests.fs.securefs_enclave import mount_block, platform_env


@pytest.fixture
def env(tmp_path):
    require("fusermount3")
    return platform_env(tmp_path)


def _app(cove, tmp_path, env, key: str, options: dict | None = None, name: str = "app"):
    cove.ok("new", name, cwd=tmp_path, env=env)
    root = tmp_path / name
    cove.ok("add", "/bin/sh", "/bin/cat", "/bin/echo", "/bin/ls", cwd=root, env=env)
    for (section, option), value in (options or {}).items():
        set_option(root / "cove.toml", section, option, value)
    with open(root / "cove.toml", "a") as handle:
        handle.write(mount_block(key=key))
    return root


def build(cove, root, env, *extra):
    return cove.ok("build", *extra, cwd=root, env=env).stdout.split()[1]


def write(cove, root, env, text="sealed data"):
    result = cove("run", "/bin/sh", "-c", f"echo '{text}' > /data/secret", cwd=root, env=env)
    assert result.returncode == 0, result.stderr


def read(cove, root, env):
    return cove("run", "/bin/cat", "/data/secret", cwd=root, env=env)


def change_image(root):
    (root / "image" / "etc").mkdir(exist_ok=True)
    (root / "image" / "etc" / "version").write_text(os.urandom(8).hex())


def test_mrenclave_data_is_unreadable_by_another_measurement(cove, tmp_path, env):
    root = _app(cove, tmp_path, env, "seal:mrenclave")
    first = build(cove, root, env)
    write(cove, root, env)
    assert read(cove, root, env).stdout == "sealed data\n"
    change_image(root)
    assert build(cove, root, env) != first
    result = read(cove, root, env)
    assert result.returncode == 3 and result.stdout == ""
    assert "encrypted mount /data: the key does not open this volume" in error_line(result)


def test_mrsigner_data_survives_a_rebuild_with_the_same_signer_only(cove, tmp_path, env):
    root = _app(cove, tmp_path, env, "seal:mrsigner")
    first = build(cove, root, env)
    write(cove, root, env)
    change_image(root)
    assert build(cove, root, env) != first
    assert read(cove, root, env).stdout == "sealed data\n"
    cove.ok("keygen", "--out", str(tmp_path / "other.pem"), env=env)
    build(cove, root, env, "--key", str(tmp_path / "other.pem"))
    result = read(cove, root, env)
    assert result.returncode == 3
    assert "the key does not open this volume" in error_line(result)


def test_a_lower_svn_cannot_read_what_a_higher_svn_sealed(cove, tmp_path, env):
    root = _app(cove, tmp_path, env, "seal:mrsigner", {("enclave", "svn"): "2"})
    build(cove, root, env)
    write(cove, root, env, "written at svn 2")
    set_option(root / "cove.toml", "enclave", "svn", "1")
    build(cove, root, env)
    result = read(cove, root, env)
    assert result.returncode == 3 and result.stdout == ""
    assert "data sealed at svn 2 cannot be unsealed by an enclave with svn 1" in error_line(result)


def test_a_higher_svn_reads_lower_svn_data_and_then_locks_older_versions_out(cove, tmp_path, env):
    root = _app(cove, tmp_path, env, "seal:mrsigner", {("enclave", "svn"): "1"})
    build(cove, root, env)
    write(cove, root, env, "written at svn 1")
    set_option(root / "cove.toml", "enclave", "svn", "3")
    build(cove, root, env)
    assert read(cove, root, env).stdout == "written at svn 1\n"  # and re-wrapped at svn 3
    set_option(root / "cove.toml", "enclave", "svn", "1")
    build(cove, root, env)
    result = read(cove, root, env)
    assert result.returncode == 3
    assert "sealed at svn 3 cannot be unsealed by an enclave with svn 1" in error_line(result)


def test_insecure_key_is_refused_at_build_unless_debug(cove, tmp_path, env):
    key = "insecure:" + os.urandom(16).hex()
    root = _app(cove, tmp_path, env, key)
    result = cove("build", cwd=root, env=env)
    assert result.returncode == 2
    line = error_line(result)
    assert "mounts[1].key: insecure: keys are refused in a non-debug enclave" in line
    assert not (root / "build" / "manifest.cbor").exists()
    set_option(root / "cove.toml", "enclave", "debug", "true")
    build(cove, root, env)
    write(cove, root, env, "debug data")
    assert read(cove, root, env).stdout == "debug data\n"


def test_file_key_source(cove, tmp_path, env):
    key_file = tmp_path / "volume.key"
    root = _app(cove, tmp_path, env, f"file:{key_file}")
    build(cove, root, env)
    result = cove("run", "/bin/echo", "hi", cwd=root, env=env)
    assert result.returncode != 0
    assert f"key file {key_file} not found" in error_line(result)
    key_file.write_text(os.urandom(16).hex() + "\n")
    write(cove, root, env, "file-keyed")
    assert read(cove, root, env).stdout == "file-keyed\n"
    key_file.write_text(os.urandom(16).hex() + "\n")
    assert "the key does not open this volume" in error_line(read(cove, root, env))


def test_kbs_key_without_a_key_broker_is_refused_at_build(cove, tmp_path, env):
    root = _app(cove, tmp_path, env, "kbs:default/volume-key/data")
    result = cove("build", cwd=root, env=env)
    assert result.returncode == 2
    assert "mounts[1].key: kbs:default/volume-key/data needs the key broker" in error_line(result)


def test_two_mounts_of_one_enclave_cannot_be_swapped(cove, tmp_path, env):
    root = make_instance(
        cove,
        tmp_path,
        extra=mount_block("/a", key="seal:mrenclave") + mount_block("/b", key="seal:mrenclave"),
        build=False,
    )
    cove.ok("build", cwd=root, env=env)
    result = cove("run", "/bin/sh", "-c", "echo A > /a/f; echo B > /b/f", cwd=root, env=env)
    assert result.returncode == 0, result.stderr
    os.rename(root / "run" / "a", root / "run" / "tmp")
    os.rename(root / "run" / "b", root / "run" / "a")
    os.rename(root / "run" / "tmp", root / "run" / "b")
    result = cove("run", "/bin/cat", "/a/f", cwd=root, env=env)
    assert result.returncode != 0
    assert "this volume belongs to '/b', not '/a'" in error_line(result)
