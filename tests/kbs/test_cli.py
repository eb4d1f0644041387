"""`cove kbs init | serve | admin | get` as a user runs them: real processes, HTTPS on loopback."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import COVE, error_line
from tests.kbs.conftest import MEASUREMENT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cli:
    def __init__(self, home: Path):
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("COVE_")}
        self.env.update(HOME=str(home), XDG_STATE_HOME=str(home / "state"), XDG_CONFIG_HOME=str(home / "config"))

    def __call__(self, *args, input: str | None = None, env: dict | None = None, timeout: float = 120):
        return subprocess.run(
            [COVE, *map(str, args)],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            env=dict(self.env, **(env or {})),
        )

    def ok(self, *args, **kwargs):
        done = self(*args, **kwargs)
        assert done.returncode == 0, f"cove {' '.join(map(str, args))}: {done.stderr}"
        return done


@pytest.fixture
def cli(tmp_path):
    return Cli(tmp_path)


@pytest.fixture
def served(cli, tmp_path, request):
    """`cove kbs serve` in its own process; stopped (SIGTERM, then SIGKILL) at the end."""
    processes = []

    def start(*extra: str, state: Path | None = None) -> str:
        port = free_port()
        log = open(tmp_path / f"serve-{port}.log", "wb")
        process = subprocess.Popen(
            [COVE, "kbs", "serve", "--listen", f"127.0.0.1:{port}", *extra],
            env=cli.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        processes.append(process)
        url = f"https://127.0.0.1:{port}"
        ca = (state or tmp_path / "state" / "cove" / "kbs") / "tls-ca.pem"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/healthz", verify=False, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, (tmp_path / f"serve-{port}.log").read_text()
            assert time.monotonic() < deadline, "cove kbs serve did not come up"
            time.sleep(0.1)
        assert ca.is_file()
        return url

    yield start
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_init_serve_admin_get(cli, served, tmp_path):
    done = cli.ok("kbs", "init")
    state = tmp_path / "state" / "cove" / "kbs"
    assert str(state) in done.stdout
    for name, mode in (("master.key", 0o600), ("admin.json", 0o600), ("tls.key", 0o600)):
        assert (state / name).stat().st_mode & 0o777 == mode, name
    policy = tmp_path / "sample.toml"
    policy.write_text('types = ["sample"]\n')
    url = served("--policy", policy)
    admin = {"COVE_KBS_URL": url}
    release = tmp_path / "release.toml"
    release.write_text(f'types = ["sample"]\n[sample]\nmeasurements = ["{MEASUREMENT}"]\n')
    cli.ok("kbs", "admin", "policy", "put", "app", release, env=admin)
    assert "app  v1" in cli.ok("kbs", "admin", "policy", "list", env=admin).stdout
    cli.ok("kbs", "admin", "secret", "create", "app/db/password", "--value", "hunter2", "--policy", "app", env=admin)
    cli.ok(
        "kbs",
        "admin",
        "secret",
        "create",
        "app/key/vol",
        "--generate",
        "aes-256",
        "--never-export",
        "--policy",
        "app",
        env=admin,
    )
    listed = cli.ok("kbs", "admin", "secret", "list", env=admin).stdout
    assert "app/key/vol  aes-256  v1  policy=app  never-export" in listed
    assert cli.ok("kbs", "admin", "secret", "export", "app/db/password", env=admin).stdout == "hunter2"
    refused = cli("kbs", "admin", "secret", "export", "app/key/vol", env=admin)
    assert refused.returncode != 0 and "403 NotExportable" in error_line(refused)

    claims = f'{{"measurement": "{MEASUREMENT}", "svn": 1}}'
    got = cli.ok(
        "kbs", "get", url, "app/db/password", "--ca", state / "tls-ca.pem", "--tee", "sample", "--sample-claims", claims
    )
    assert got.stdout == "hunter2"
    out = tmp_path / "vol.key"
    cli.ok(
        "kbs",
        "get",
        url,
        "app/key/vol",
        "--ca",
        state / "tls-ca.pem",
        "--tee",
        "sample",
        "--sample-claims",
        claims,
        "--out",
        out,
    )
    assert len(out.read_bytes()) == 32 and out.stat().st_mode & 0o777 == 0o600
    denied = cli("kbs", "get", url, "app/db/password", "--ca", state / "tls-ca.pem", "--tee", "sample")
    assert denied.returncode != 0 and "401 PolicyDeny" in error_line(denied)
    outside = cli("kbs", "get", url, "app/db/password", "--ca", state / "tls-ca.pem")  # cove evidence, no enclave
    assert outside.returncode != 0 and "cannot get evidence from /dev/attestation" in error_line(outside)
    audit = cli.ok("kbs", "admin", "audit", "--action", "release", env=admin).stdout
    assert "app/db/password@1  ok  " + MEASUREMENT in audit


def test_serve_on_postgresql(cli, served, pg, tmp_path):
    db = pg.create_database("cli_" + os.urandom(4).hex())
    cli.ok("kbs", "init", "--db", db)
    url = served("--db", db)
    cli.ok("kbs", "admin", "policy", "put", "p", "-", input='types = ["cove"]\n', env={"COVE_KBS_URL": url})
    assert "p  v1" in cli.ok("kbs", "admin", "policy", "list", env={"COVE_KBS_URL": url}).stdout


def test_two_serve_processes_one_postgresql(cli, served, pg, tmp_path):
    db = pg.create_database("cli_" + os.urandom(4).hex())
    cli.ok("kbs", "init", "--db", db)
    first, second = served("--db", db), served("--db", db)
    cli.ok("kbs", "admin", "policy", "put", "p", "-", input='types = ["cove"]\n', env={"COVE_KBS_URL": first})
    assert "p  v1" in cli.ok("kbs", "admin", "policy", "list", env={"COVE_KBS_URL": second}).stdout
    ca = ssl.create_default_context(cafile=str(tmp_path / "state" / "cove" / "kbs" / "tls-ca.pem"))
    assert httpx.get(first + "/kbs/v0/jwks", verify=ca).json() == httpx.get(second + "/kbs/v0/jwks", verify=ca).json()


@pytest.mark.parametrize(
    "args, words",
    [
        (("kbs", "serve"), "run `cove kbs init` first"),
        (
            (
                "kbs",
                "serve",
                "--insecure-http",
                "--db",
                "postgresql://nobody@127.0.0.1:1/none",
                "--master-key-file",
                "/nonexistent",
            ),
            "master key file /nonexistent not found",
        ),
        (("kbs", "admin", "secret", "list"), "no broker URL"),
        (
            ("kbs", "admin", "--url", "https://127.0.0.1:1", "--key", "/nonexistent", "secret", "list"),
            "admin key file /nonexistent not found",
        ),
        (("kbs", "get", "https://127.0.0.1:1", "a/b/c", "--tee", "sgx"), "makes cove or sample evidence"),
        (("kbs", "get", "https://127.0.0.1:1", "a/b/c", "--tee", "sample"), "cannot reach the broker"),
        (
            ("kbs", "get", "https://127.0.0.1:1", "a/b/c", "--ca", "/x.pem", "--kbs-policy", "/p.toml"),
            "--ca and --kbs-policy exclude each other",
        ),
        (
            ("kbs", "get", "https://127.0.0.1:1", "a/b/c", "--tee", "sample", "--kbs-policy", "/nonexistent.toml"),
            "policy /nonexistent.toml: not found",
        ),
        (
            ("kbs", "get", "http://127.0.0.1:1", "a/b/c", "--tee", "sample", "--kbs-policy", 'types = ["cove"]'),
            "needs an https:// URL",
        ),
        (("kbs", "serve", "--ra-tls", "--insecure-http"), "--ra-tls makes its own certificate"),
    ],
)
def test_user_errors_are_one_line(cli, args, words):
    done = cli(*args)
    assert done.returncode != 0
    assert words in error_line(done)


def test_serve_refuses_wrong_master_key(cli, tmp_path):
    cli.ok("kbs", "init")
    other = tmp_path / "other.key"
    other.write_text(os.urandom(32).hex())
    done = cli("kbs", "serve", "--master-key-file", other, "--listen", f"127.0.0.1:{free_port()}")
    assert done.returncode != 0 and "does not match" in error_line(done)


def test_init_is_idempotent(cli, tmp_path):
    cli.ok("kbs", "init")
    state = tmp_path / "state" / "cove" / "kbs"
    before = {name: (state / name).read_bytes() for name in ("master.key", "admin.json", "tls.crt")}
    cli.ok("kbs", "init")
    assert before == {name: (state / name).read_bytes() for name in before}


def test_master_key_sealed_to_the_platform(cli, served, tmp_path):
    platform = {"COVE_PLATFORM_DIR": str(tmp_path / "platform")}
    (tmp_path / "platform").mkdir(mode=0o700)
    cli.env.update(platform)
    done = cli.ok("kbs", "init", "--sealed")
    state = tmp_path / "state" / "cove" / "kbs"
    assert (state / "master.sealed").exists() and not (state / "master.key").exists()
    assert "master.sealed" in done.stdout
    url = served()
    cli.ok("kbs", "admin", "policy", "put", "p", "-", input='types = ["cove"]\n', env={"COVE_KBS_URL": url})
    # another platform cannot unseal it
    elsewhere = cli(
        "kbs",
        "serve",
        "--listen",
        f"127.0.0.1:{free_port()}",
        env={"COVE_PLATFORM_DIR": str(tmp_path / "other-platform")},
    )
    assert elsewhere.returncode != 0 and "cannot unseal the master key" in error_line(elsewhere)
