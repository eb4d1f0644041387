"""Direct `cove run` prepares its sim sandbox before the services start (cove.runtime.launcher).

The sandbox's first process is forked and joins its cgroups while the /dev/attestation server starts
(sim.Prepared), as a node supervisor does: the launch then takes it. Its limits are the verified
configuration's, and a start that fails after it was prepared leaves no process and no cgroup behind.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cove.runtime import limits
from tests.conftest import require
from tests.daemon.conftest import make_hello_instance

# `cove run` as its entry point runs it, reporting which sandboxes were prepared and the limits of those started
DRIVER = (
    "import sys\n"
    "from cove.runtime import sim\n"
    "started = []\n"
    "real = sim.Prepared.start\n"
    "def start(self, argv, env):\n"
    "    started.append((self.resources.memory, self.resources.max_processes))\n"
    "    return real(self, argv, env)\n"
    "sim.Prepared.start = start\n"
    "made, prepare = [], sim.prepare\n"
    "def prepare_(resources):\n"
    "    made.append(prepare(resources) is not None)\n"
    "    return made[-1]\n"
    "sim.prepare = prepare_\n"
    "from cove.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "sys.stderr.write(f'prepared: {made} started: {started}\\n')\n"
    "sys.exit(code)\n"
)


@pytest.fixture(scope="module")
def limited(cove, hello, tmp_path_factory) -> Path:
    """An instance whose cove.toml asks limits other than the defaults."""
    require("bwrap")
    root = make_hello_instance(cove, tmp_path_factory.mktemp("limited"), hello)
    toml = (root / "cove.toml").read_text()
    toml = toml.replace('memory = "512M"', 'memory = "96M"').replace("max_processes = 64", "max_processes = 9")
    assert "96M" in toml and "max_processes = 9" in toml
    (root / "cove.toml").write_text(toml)
    cove.ok("build", cwd=root)
    return root


def direct(cove) -> dict[str, str]:
    return dict(cove.env, COVE_NO_DAEMON="1", COVE_DAEMON_SOCKET="/nonexistent/cove.sock")


def left_of(pid: int) -> list[str]:
    """The cove-PID-* cgroups still there (a launcher's enclave groups are named after it)."""
    return [str(p / n) for p in limits.parents() for n in sorted(p.iterdir()) if n.name.startswith(f"cove-{pid}-")]


def test_the_launch_takes_the_sandbox_prepared_with_the_verified_limits(cove, limited):
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, "run", "/bin/hello", "0", "3"],
        cwd=limited,
        env=direct(cove),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stdout) == (3, "hello 3\n"), result.stderr
    assert f"prepared: [True] started: [({96 << 20}, 9)]" in result.stderr.splitlines()


@pytest.mark.parametrize("case", ["missing program", "tampered image"])
def test_a_start_failing_after_the_prepare_leaves_nothing(cove, limited, tmp_path, case):
    root, program = limited, "/bin/hello"
    if case == "missing program":
        program = "/bin/missing"
    else:
        root = tmp_path / "tampered"
        shutil.copytree(limited, root, symlinks=True)
        with open(root / "image" / "bin" / "hello", "ab") as handle:
            handle.write(b"\0")
    launcher = subprocess.Popen(
        [sys.executable, "-c", DRIVER, "run", program],
        cwd=root,
        env=direct(cove),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode in (3, 127) and "Traceback" not in err, err
    assert "prepared: [True] started: []" in err.splitlines()  # prepared, never started
    assert left_of(launcher.pid) == []
