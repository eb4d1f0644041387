"""The systemd units scripts/setup installs: rendered, then checked by systemd-analyze (systemd is not booted)."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import COVE, ROOT, require

RENDER = ROOT / "deploy" / "systemd" / "render"
COVE_RUNTIME = str(ROOT / ".venv" / "bin" / "cove-runtime")
# (unit, command, what its ExecStart runs)
UNITS = [("cove", COVE, "daemon"), ("cove-runtime", COVE_RUNTIME, "resident --foreground")]


def _render(command: str, unit: str) -> str:
    return subprocess.run([str(RENDER), command, unit], capture_output=True, text=True, check=True).stdout


def _verify(unit_text: str, unit: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / f"{unit}.service"
    path.write_text(unit_text)
    return subprocess.run([require("systemd-analyze"), "verify", str(path)], capture_output=True, text=True)


@pytest.mark.parametrize("unit, command, runs", UNITS, ids=[u[0] for u in UNITS])
def test_rendered_unit_verifies(tmp_path, unit, command, runs):
    text = _render(command, unit)
    # what the service started outlives a restart of it: enclaves (daemon), containers' workers (helper)
    assert f"ExecStart={command} {runs}" in text and "KillMode=process" in text
    checked = _verify(text, unit, tmp_path)
    assert checked.returncode == 0 and checked.stdout + checked.stderr == "", checked.stderr


def test_verify_catches_a_broken_unit(tmp_path):
    """The check can fail: a missing command, a bad setting."""
    text = _render("/nonexistent/cove", "cove")
    assert "not executable" in _verify(text, "cove", tmp_path).stderr
    good = _render(COVE, "cove")
    assert "kill mode" in _verify(good.replace("KillMode=process", "KillMode=bogus"), "cove", tmp_path).stderr


def test_render_refuses_bad_paths_and_units():
    for args in (["relative/cove"], ["/with space/cove"], ["/a|b/cove"], [COVE, "containerd"], [COVE, "../cove"]):
        done = subprocess.run([str(RENDER), *args], capture_output=True, text=True)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, args
    assert _render(COVE, "cove") == subprocess.run([str(RENDER), COVE], capture_output=True, text=True).stdout
    setup = (ROOT / "scripts" / "setup").read_text()
    assert "deploy/systemd/render" in setup and "cove-runtime.service" in setup
