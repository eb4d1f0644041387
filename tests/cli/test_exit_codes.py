"""Every command's mistakes: one line on stderr, no traceback, a code from the one table (docs/cli.md)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cove.errors import ExitCode
from tests.conftest import error_line
from tests.e2e.helpers import make_instance

DOCS = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "cove-test", str(where)], capture_output=True, text=True
    )
    assert done.returncode == 0, f"these tests mount a tmpfs and need root: {done.stderr.strip()}"


@pytest.fixture(scope="module")
def world(cove, probe, tmp_path_factory):
    """A built instance, a read-only folder, a full 1 MB folder and an admin key; unmounted at the end."""
    base = tmp_path_factory.mktemp("codes")
    app = make_instance(cove, base, probe)
    readonly, full, small = base / "ro", base / "full", base / "runtime"
    _mount_tmpfs(readonly, "ro,size=1m")
    _mount_tmpfs(full, "size=1m")
    _mount_tmpfs(small, "size=512k")
    _mount_tmpfs(base / "tiny", "size=40k")
    cove.ok("package", str(base / "app.tar.gz"), cwd=app)
    cove.ok("kbs", "init", "--state", str(base / "kbs"))
    cove.ok("new", "robuild", cwd=base)
    _mount_tmpfs(base / "robuild" / "build", "ro,size=1m")
    (base / "garbage.bin").write_bytes(b"garbage")
    odd = os.fsencode(base / "nonutf")
    os.makedirs(odd)
    open(os.path.join(odd, b"bad\xff\xfe.txt"), "wb").close()
    for name, plant in (
        ("odd", lambda image: shutil.copytree(odd, os.path.join(image, b"opt"), dirs_exist_ok=True)),
        ("oddlink", lambda image: os.symlink(b"/etc/\xff", os.path.join(image, b"bin/link"))),
    ):
        cove.ok("new", name, cwd=base)
        plant(os.fsencode(base / name / "image"))
    for name, text in POLICIES.items():
        (base / name).write_text(text)
    cove.ok("new", "small", cwd=full)
    (base / "big").write_bytes(os.urandom(2 << 20))
    (base / "plain.txt").write_text("hello\n")
    (base / "k.key").write_bytes(os.urandom(16))
    cove.ok("kbs", "admin", "key", "new", "ops", str(base / "admin.json"))
    admin = json.loads((base / "admin.json").read_text())
    (base / "admin.json").write_text(json.dumps(dict(admin, audience="cove-kbs:test")))
    yield {"base": base, "app": app, "ro": readonly, "full": full, "runtime": small}
    for where in (readonly, full, small, base / "robuild" / "build", base / "tiny"):
        subprocess.run(["umount", str(where)], check=False)


UNREACHABLE = "https://127.0.0.1:1"
POLICIES = {
    "bad.toml": "not [toml",
    "unknown.toml": "[cove]\nbogus = 1\n",
    "measurement.toml": '[cove]\nmeasurements = ["zz"]\n',
}
SERVE = ["kbs", "serve", "--state", "{base}/kbs", "--insecure-http", "--listen", "127.0.0.1:0", "--policy"]

# (case, arguments with {base}/{app}/{ro}/{full} filled in, cwd key, code, words in the error line)
CASES = [
    ("unknown option", ["build", "--nope"], "app", ExitCode.USAGE, "No such option '--nope'"),
    ("unknown command", ["frob"], "base", ExitCode.USAGE, "No such command 'frob'"),
    ("empty name", ["new", ""], "base", ExitCode.USAGE, "cove new needs a NAME"),
    ("bad name", ["new", "a b"], "base", ExitCode.USAGE, "cove new 'a b': not a valid enclave name (use"),
    ("no instance", ["build"], "ro", ExitCode.NOT_FOUND, "is not a Cove instance"),
    (
        "inspect missing",
        ["inspect", "/nonexistent.tar.gz"],
        "base",
        ExitCode.NOT_FOUND,
        "/nonexistent.tar.gz does not exist",
    ),
    ("-C missing", ["-C", "/nonexistent/app", "build"], "base", ExitCode.NOT_FOUND, "/nonexistent/app does not exist"),
    (
        "token key missing",
        ["verify", "--token", "--token-key", "/nonexistent/key.pem", "{base}/plain.txt"],
        "base",
        ExitCode.NOT_FOUND,
        "--token-key /nonexistent/key.pem: no such file",
    ),
    (
        "jwks key missing",
        ["jwks", "--token-key", "/nonexistent/key.pem"],
        "base",
        ExitCode.NOT_FOUND,
        "--token-key /nonexistent/key.pem: no such file",
    ),
    (
        "run state tree",
        ["run", "--state", "/nonexistent/x", "/bin/probe", "exit", "0"],
        "app",
        ExitCode.NOT_FOUND,
        "--state /nonexistent/x: the folder /nonexistent does not exist",
    ),
    (
        "ek chain missing",
        ["platform", "init", "--ek-chain", "/nonexistent"],
        "base",
        ExitCode.NOT_FOUND,
        "--ek-chain /nonexistent: no such file",
    ),
    (
        "ak ca missing",
        ["platform", "init", "--ak-ca", "/nonexistent"],
        "base",
        ExitCode.NOT_FOUND,
        "--ak-ca /nonexistent: no such folder",
    ),
    (
        "ek chain without tpm",
        ["platform", "init", "--no-tpm", "--ek-chain", "{base}/plain.txt"],
        "base",
        ExitCode.USAGE,
        "do not go with --no-tpm",
    ),
    (
        "program not in image",
        ["run", "/bin/nothing-here"],
        "app",
        ExitCode.PROGRAM_NOT_FOUND,
        "/bin/nothing-here is not in the image",
    ),
    ("relative program", ["run", "../bin/hello"], "app", ExitCode.USAGE, "e.g. /bin/hello"),
    (
        "audit action",
        ["kbs", "admin", "--url", UNREACHABLE, "--key", "{base}/admin.json", "audit", "--action", "bogus"],
        "base",
        ExitCode.USAGE,
        "--action bogus: no such action (one of attest, release",
    ),
    (
        "broker unreachable",
        ["kbs", "admin", "--url", UNREACHABLE, "--key", "{base}/admin.json", "secret", "list"],
        "base",
        ExitCode.UNREACHABLE,
        "cannot reach the broker at https://127.0.0.1:1",
    ),
    (
        "ca missing",
        [
            "kbs",
            "admin",
            "--url",
            UNREACHABLE,
            "--key",
            "{base}/admin.json",
            "--ca",
            "/nonexistent.pem",
            "secret",
            "list",
        ],
        "base",
        ExitCode.NOT_FOUND,
        "CA certificate /nonexistent.pem not found",
    ),
    (
        "ca not a certificate",
        ["kbs", "admin", "--url", UNREACHABLE, "--key", "{base}/admin.json", "--ca", "/etc/hostname", "secret", "list"],
        "base",
        ExitCode.USAGE,
        "CA certificate /etc/hostname is not a PEM certificate",
    ),
    (
        "policy file missing",
        ["kbs", "admin", "--url", UNREACHABLE, "--key", "{base}/admin.json", "policy", "put", "p", "/nonexistent.toml"],
        "base",
        ExitCode.NOT_FOUND,
        "'/nonexistent.toml': No such file or directory",
    ),
    (
        "policy file a folder",
        ["kbs", "admin", "--url", UNREACHABLE, "--key", "{base}/admin.json", "policy", "put", "p", "{base}"],
        "base",
        ExitCode.FILE_SYSTEM,
        "Is a directory",
    ),
    (
        "admin key missing",
        ["kbs", "admin", "--url", UNREACHABLE, "--key", "/nonexistent.json", "secret", "list"],
        "base",
        ExitCode.NOT_FOUND,
        "admin key file /nonexistent.json not found",
    ),
    (
        "bad cove evidence",
        ["verify", "--type", "cove", "{base}/garbage.bin"],
        "base",
        ExitCode.INVALID_EVIDENCE,
        "cove: error: Cove evidence: evidence is not valid CBOR",
    ),
    ("serve policy not toml", SERVE + ["{base}/bad.toml"], "base", ExitCode.USAGE, "bad.toml: not valid TOML"),
    (
        "serve policy unknown key",
        SERVE + ["{base}/unknown.toml"],
        "base",
        ExitCode.USAGE,
        "unknown.toml: cove.bogus: not a setting for cove evidence",
    ),
    (
        "serve policy bad measurement",
        SERVE + ["{base}/measurement.toml"],
        "base",
        ExitCode.USAGE,
        "measurement.toml: cove.measurements[0]: must be a hex string",
    ),
    ("serve policy missing", SERVE + ["{base}/none.toml"], "base", ExitCode.NOT_FOUND, "none.toml: no such file"),
    (
        "add non-UTF-8 name",
        ["add", "--to", "/opt/x", "{base}/nonutf"],
        "app",
        ExitCode.USAGE,
        "nonutf/bad\\xff\\xfe.txt: the name is not valid UTF-8 (rename it",
    ),
    (
        "build non-UTF-8 name",
        ["build"],
        "odd",
        ExitCode.USAGE,
        "image/opt/bad\\xff\\xfe.txt: the name is not valid UTF-8",
    ),
    (
        "build non-UTF-8 link",
        ["build"],
        "oddlink",
        ExitCode.USAGE,
        "image/bin/link -> /etc/\\xff: the name is not valid",
    ),
    # read-only folders, a full disk, an I/O error: the line names the file
    ("build read-only", ["build"], "robuild", ExitCode.FILE_SYSTEM, "cannot write build/"),
    ("new read-only", ["new", "app"], "ro", ExitCode.FILE_SYSTEM, "cannot create app: Read-only file system"),
    (
        "keygen read-only",
        ["keygen", "--out", "{ro}/key.pem"],
        "base",
        ExitCode.FILE_SYSTEM,
        "/ro/key.pem: Read-only file system (the file system is read-only",
    ),
    (
        "kbs init read-only",
        ["kbs", "init", "--state", "{ro}/kbs"],
        "base",
        ExitCode.FILE_SYSTEM,
        "/ro/kbs: Read-only file system",
    ),
    (
        "kbs init full disk",
        ["kbs", "init", "--state", "{base}/tiny/kbs"],
        "base",
        ExitCode.USAGE,
        "kbs.db: database or disk is full",
    ),
    (
        "package read-only",
        ["package", "{ro}/app.tar.gz"],
        "app",
        ExitCode.FILE_SYSTEM,
        "/ro/app.tar.gz: Read-only file system",
    ),
    (
        "fs encrypt read-only",
        ["fs", "encrypt", "--key", "file:{base}/k.key", "{base}/plain.txt", "{ro}/out"],
        "base",
        ExitCode.FILE_SYSTEM,
        "/ro/out: Read-only file system",
    ),
    (
        "add special file",
        ["add", "--no-deps", "/proc/self/mem"],
        "app",
        ExitCode.FILE_SYSTEM,
        "/proc/self/mem: Input/output error",
    ),
    (
        "add to a full disk",
        ["add", "--to", "/data", "{base}/big"],
        "full/small",
        ExitCode.FILE_SYSTEM,
        "No space left on device (the disk is full",
    ),
]


@pytest.mark.parametrize("case, args, cwd, code, words", CASES, ids=[case[0] for case in CASES])
def test_error_is_one_line_with_its_code(cove, world, case, args, cwd, code, words):
    fill = {name: str(world[name]) for name in ("base", "app", "ro", "full")}
    result = cove(*[arg.format(**fill) for arg in args], cwd=world["base"] / cwd if cwd != "base" else world["base"])
    line = error_line(result)
    assert line.startswith("cove: error: ") and not line.startswith("cove: error: cove:")
    assert words in line, line
    assert result.returncode == code, (result.returncode, line)


def test_nothing_half_written(cove, world):
    """After the failures above, no key, folder tree or partial copy was left behind."""
    assert not Path("/nonexistent").exists()
    assert not os.listdir(world["ro"])
    assert not os.listdir(world["base"] / "tiny")  # a first kbs init that failed removed its state folder
    small = world["full"] / "small" / "image"
    assert not (small / "data").exists()
    leftovers = [p for p in small.parent.rglob("*") if "cove-" in p.name]
    assert not leftovers, leftovers


def test_every_code_is_documented():
    table = DOCS.read_text()
    for code in ExitCode:
        if code not in (ExitCode.OK, ExitCode.SIGNAL):
            assert f"\n| {int(code)} |" in table, f"exit code {int(code)} ({code.name}) is missing from docs/cli.md"
    assert "| 128 + N |" in table


def test_old_debug_spelling_still_works_with_a_notice(cove, world):
    result = cove("run", "--debug", "/bin/sh", "-c", "true", cwd=world["app"])
    assert result.returncode == ExitCode.USAGE  # not a debug enclave: the old flag still means --debug-enclave
    assert "`cove run --debug` is now `cove run --debug-enclave`" in result.stderr
    assert "--debug-enclave needs a debug enclave" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    "args",
    [
        ["run", "/bin/probe", "exit", "0"],
        ["run", "--package", "{base}/app.tar.gz", "/bin/probe", "exit", "0"],
        ["inspect", "{base}/app.tar.gz"],
    ],
    ids=["run", "run-package", "inspect"],
)
def test_small_runtime_dir_says_how_much_and_where(cove, world, args):
    runtime = world["runtime"]
    result = cove(
        *[arg.format(base=world["base"]) for arg in args], cwd=world["app"], env={"COVE_RUNTIME_DIR": str(runtime)}
    )
    line = error_line(result)
    assert result.returncode == ExitCode.FILE_SYSTEM
    assert f"no space left in the runtime folder {runtime} (0.5 MB free)" in line
    assert re.search(r"copied there, about \d+\.\d MB plus", line) and "set COVE_RUNTIME_DIR" in line
    assert not os.listdir(runtime)  # nothing left behind


def test_kbs_init_again_says_what_it_kept(cove, world):
    again = cove.ok("kbs", "init", "--state", str(world["base"] / "kbs"), "--url", "https://kbs.example")
    assert "(already set up: nothing was replaced)" in again.stdout
    assert again.stdout.count("[existing, kept]") == 4  # database, master key, admin key, TLS
    assert "--url was not recorded" in again.stderr


def test_inspect_names_the_backend_that_will_run(cove, world):
    shown = json.loads(cove.ok("inspect", "--json", cwd=world["app"]).stdout)
    assert shown["backend"] == "auto" and shown["runs_on"] in ("sim", "vm")


def test_an_empty_image_builds_with_a_warning(cove, world):
    cove.ok("new", "empty", cwd=world["base"])
    built = cove.ok("build", cwd=world["base"] / "empty")
    assert "the image holds no files" in built.stderr and "cove add" in built.stderr


def test_help_says_what_minus_c_does(cove):
    assert "does not change directory" in " ".join(cove.ok("--help").stdout.split())


def test_an_unreachable_broker_at_run_is_not_a_refusal(cove, world, tmp_path):
    app = make_instance(
        cove,
        tmp_path,
        name="prov",
        build=False,
        extra=(
            '\n[attestation]\nkbs = "http://127.0.0.1:1"\nretries = 0\n'
            '\n[[secrets]]\nname = "s"\nresource = "a/b/c"\ntarget = "env:S"\n'
        ),
    )
    cove.ok("build", cwd=app)
    result = cove("run", "/bin/sh", "-c", "echo started", cwd=app, env={"COVE_PLATFORM_DIR": str(tmp_path / "pf")})
    assert "cannot reach the broker at http://127.0.0.1:1" in error_line(result)
    assert result.returncode == ExitCode.UNREACHABLE and "started" not in result.stdout
