"""Shared fixtures: the real cove command, real tools, no silent skips.

A missing system dependency fails the test with the setup command to run.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COVE = str(Path(sys.executable).parent / "cove")
SETUP_HINT = "run `sudo scripts/setup` to install Cove's system packages"


def require(tool: str) -> str:
    """The path of a system tool, or a test failure naming the setup command."""
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        pytest.fail(f"{tool} is not installed: {SETUP_HINT}", pytrace=False)
    return path


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class Cove:
    """Runs the installed `cove` command with a private key folder."""

    def __init__(self, home: Path):
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("COVE_")}
        self.env["XDG_CONFIG_HOME"] = str(home)
        self.env["HOME"] = str(home)
        self.prefix: list[str] = []  # e.g. setpriv, to run cove as another user
        self.command = COVE

    def __call__(
        self,
        *args: str,
        cwd: Path | None = None,
        input: str | None = None,
        timeout: float = 120,
        env: dict | None = None,
    ) -> Result:
        full_env = dict(self.env, **(env or {}))
        proc = subprocess.run(
            [*self.prefix, self.command, *map(str, args)],
            cwd=cwd,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def ok(self, *args: str, **kwargs) -> Result:
        result = self(*args, **kwargs)
        assert result.returncode == 0, f"cove {' '.join(map(str, args))} failed:\n{result.stderr}"
        return result

    def popen_args(self, *args: str) -> list[str]:
        return [*self.prefix, self.command, *map(str, args)]

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.popen_args(*args), env=self.env, **kwargs)


@pytest.fixture(scope="session")
def cove(tmp_path_factory) -> Cove:
    require("bwrap")
    return Cove(tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="session")
def probe(tmp_path_factory) -> Path:
    """A small C program that tests isolation from inside the enclave."""
    require("gcc")
    out = tmp_path_factory.mktemp("probe") / "probe"
    subprocess.run(["gcc", "-O1", "-Wall", "-o", str(out), str(ROOT / "tests" / "e2e" / "probe.c")], check=True)
    return out


TEST_USER = "cove-test"


@pytest.fixture(scope="session")
def user_cove() -> Cove:
    """`cove` run as an unprivileged account (cove-test, made here if missing), in a folder it owns.

    Its ``workdir`` holds instances and a copy of the probe; the checkout and
    its venv must be readable by every user (clone it outside /root). When
    the venv's interpreter is not (a venv made from a Python under /root, as
    pyenv makes), the account runs the same installed code through a venv of
    Debian's Python of the same version (see _shim).
    """
    if os.geteuid() == 0:
        require("useradd")
        setpriv = require("setpriv")
        try:
            account = pwd.getpwnam(TEST_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
                check=True,
                capture_output=True,
            )
            account = pwd.getpwnam(TEST_USER)
        uid, gid = account.pw_uid, account.pw_gid
        prefix = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    else:
        uid, gid, prefix = os.getuid(), os.getgid(), []
    base = Path(tempfile.mkdtemp(prefix="cove-test-user-"))
    (base / "home").mkdir()
    for path in (base, base / "home"):
        os.chown(path, uid, gid)
    runner = Cove(base / "home")
    runner.env["COVE_PLATFORM_DIR"] = str(base / "home" / "platform")  # /var/lib/cove is root's
    runner.prefix = prefix
    runner.workdir = base
    runner.uid, runner.gid = uid, gid
    # cove starts Python again for its services: the interpreter must be reachable too
    if not _runs(prefix, sys.executable, base) and (shim := _shim(base)) is not None:
        runner.command = str(shim / "bin" / "cove")
    check = subprocess.run(
        [*prefix, "/bin/sh", "-c", 'exec "$0" -c "import cove"', str(Path(runner.command).parent / "python")],
        capture_output=True,
        text=True,
        cwd=base,
    )
    if check.returncode != 0:
        pytest.fail(
            f"{TEST_USER} cannot run {runner.command} ({check.stderr.strip()[:200]}): make the "
            "checkout and the venv's Python readable by every user (e.g. clone outside /root and "
            "make .venv from /usr/bin/python3), then run scripts/setup",
            pytrace=False,
        )
    yield runner
    shutil.rmtree(base, ignore_errors=True)


def _runs(prefix: list[str], python: str, cwd: Path) -> bool:
    """Whether python can be started (from a shell, as the account: not just the first exec)."""
    return (
        subprocess.run(
            [*prefix, "/bin/sh", "-c", 'exec "$0" -c "import cove"', python], capture_output=True, cwd=cwd
        ).returncode
        == 0
    )


def _shim(base: Path) -> Path | None:
    """A venv of Debian's Python of this version on this venv's site-packages, or None."""
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system.exists():
        return None
    venv = base / "venv"
    subprocess.run([str(system), "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    site_dir = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site_dir / "cove-tests.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    script = venv / "bin" / "cove"
    script.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom cove.cli import run_main\nsys.exit(run_main())\n")
    script.chmod(0o755)
    return venv


@pytest.fixture(scope="module", params=["root", "user"])
def whoever(request, tmp_path_factory, probe):
    """(cove, a folder for instances, the probe) for root, then for an unprivileged user."""
    if request.param == "root":
        return request.getfixturevalue("cove"), tmp_path_factory.mktemp("as-root"), probe
    runner = request.getfixturevalue("user_cove")
    parent = Path(tempfile.mkdtemp(prefix="as-user-", dir=runner.workdir))
    copy = parent / "probe"
    shutil.copy(probe, copy)
    for path in (parent, copy):
        os.chown(path, runner.uid, runner.gid)
    return runner, parent, copy


def error_line(result: Result) -> str:
    """The single error line cove printed; fails if there is not exactly one."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {result.stderr!r}"
    assert "Traceback" not in result.stderr
    return lines[0]


def raised_at_once(call: Callable[[], object], seconds: float = 20) -> BaseException | None:
    """What ``call`` raised (None if nothing), failing the test if it has not returned within ``seconds``: for
    code that an attack could make wait for ever (a FIFO, /dev/zero), so the old code fails, not hangs."""
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=seconds)
    assert not worker.is_alive(), "it blocked"
    return outcome[0] if outcome else None
