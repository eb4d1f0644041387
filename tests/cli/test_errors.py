"""Mistakes a user can make give one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import pytest

from tests.conftest import error_line
from tests.e2e.helpers import make_instance, set_option


@pytest.fixture(scope="module")
def app(cove, probe, tmp_path_factory):
    return make_instance(cove, tmp_path_factory.mktemp("errors"), probe)


@pytest.mark.parametrize(
    "section, key, value, words",
    [
        ("enclave", "svn", '"three"', "enclave.svn: must be an integer"),
        ("resources", "memory", '"-1M"', "resources.memory"),
        ("network", "mode", '"wifi"', "network.mode"),
    ],
)
def test_bad_config_is_one_line(cove, tmp_path, section, key, value, words):
    cove.ok("new", "bad", cwd=tmp_path)
    set_option(tmp_path / "bad" / "cove.toml", section, key, value)
    result = cove("build", cwd=tmp_path / "bad")
    assert result.returncode == 2
    assert words in error_line(result)


def test_unknown_key_is_named(cove, tmp_path):
    cove.ok("new", "bad", cwd=tmp_path)
    with open(tmp_path / "bad" / "cove.toml", "a") as handle:
        handle.write("\n[network2]\nmode = 1\n")
    result = cove("build", cwd=tmp_path / "bad")
    assert result.returncode == 2
    assert "network2: unknown key" in error_line(result)


def test_entry_point_not_allowed(cove, app):
    result = cove("run", "/etc/passwd", cwd=app)
    assert result.returncode == 2
    assert "/etc/passwd is not an entry point" in error_line(result)


def test_program_missing(cove, app):
    result = cove("run", "/bin/nothing-here", cwd=app)
    assert result.returncode == 127
    assert "/bin/nothing-here is not in the image" in error_line(result)


def test_relative_program_is_explained(cove, app):
    result = cove("run", "probe", cwd=app)
    assert result.returncode == 2
    assert "absolute path" in error_line(result)


def test_debug_shell_is_refused_in_a_non_debug_enclave(cove, app):
    result = cove("run", "--debug-enclave", "/bin/sh", "-c", "echo inside", cwd=app)
    assert result.returncode == 2
    assert "--debug-enclave needs a debug enclave" in error_line(result)
    assert "inside" not in result.stdout


def test_debug_shell_opens_in_a_debug_enclave(cove, probe, tmp_path):
    root = make_instance(
        cove, tmp_path, probe, options={("enclave", "debug"): "true", ("process", "entry_points"): '["/bin/probe"]'}
    )
    result = cove("run", "--debug-enclave", "/bin/sh", "-c", "echo inside", cwd=root)
    assert result.returncode == 0 and result.stdout == "inside\n"
    # without --debug the entry points still apply
    assert cove("run", "/bin/sh", "-c", "true", cwd=root).returncode == 2


def test_not_an_instance(cove, tmp_path):
    result = cove("build", cwd=tmp_path)
    assert result.returncode == 8
    assert "is not a Cove instance" in error_line(result)


def test_new_never_overwrites(cove, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep").write_text("mine")
    result = cove("new", "taken", cwd=tmp_path)
    assert result.returncode == 2
    assert "already exists" in error_line(result)
    assert (tmp_path / "taken" / "keep").read_text() == "mine"
    assert not (tmp_path / "taken" / "cove.toml").exists()


def test_run_before_build(cove, tmp_path):
    cove.ok("new", "fresh", cwd=tmp_path)
    result = cove("run", "/bin/sh", cwd=tmp_path / "fresh")
    assert result.returncode == 3
    assert "cove build" in error_line(result)


def test_bad_signing_key(cove, app, tmp_path):
    key = tmp_path / "key.pem"
    key.write_text("not a key")
    result = cove("build", "--key", str(key), cwd=app)
    assert result.returncode == 2
    assert "not an unencrypted PEM private key" in error_line(result)


def test_unknown_backend(cove, app):
    result = cove("run", "--backend", "sgx", "/bin/probe", "exit", "0", cwd=app)
    assert result.returncode == 2
    assert "backend sgx is unavailable" in error_line(result)


def test_missing_host_mount_source(cove, probe, tmp_path):
    root = make_instance(
        cove,
        tmp_path,
        probe,
        extra=('\n[[mounts]]\ntarget = "/data"\ntype = "host"\nsource = "/nonexistent/cove-data"\n'),
    )
    result = cove("run", "/bin/probe", "exit", "0", cwd=root)
    assert result.returncode == 2
    assert "/nonexistent/cove-data does not exist" in error_line(result)


def test_traceback_only_with_debug(cove, tmp_path):
    result = cove("--debug", "build", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr
