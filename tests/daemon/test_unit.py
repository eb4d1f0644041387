"""The systemd unit scripts/setup installs: rendered, then checked by systemd-analyze (systemd is not booted)."""

from __future__ import annotations

import subprocess

from tests.conftest import COVE, ROOT, require

RENDER = ROOT / "deploy" / "systemd" / "render"


def _verify(unit_text: str, tmp_path) -> subprocess.CompletedProcess:
    unit = tmp_path / "cove.service"
    unit.write_text(unit_text)
    return subprocess.run([require("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True)


def test_rendered_unit_verifies(tmp_path):
    text = subprocess.run([str(RENDER), COVE], capture_output=True, text=True, check=True).stdout
    assert f"ExecStart={COVE} daemon" in text and "KillMode=process" in text  # enclaves outlive a restart
    checked = _verify(text, tmp_path)
    assert checked.returncode == 0 and checked.stdout + checked.stderr == "", checked.stderr


def test_verify_catches_a_broken_unit(tmp_path):
    """The check can fail: a missing command, a bad setting."""
    text = subprocess.run([str(RENDER), "/nonexistent/cove"], capture_output=True, text=True, check=True).stdout
    assert "not executable" in _verify(text, tmp_path).stderr
    good = subprocess.run([str(RENDER), COVE], capture_output=True, text=True, check=True).stdout
    assert "kill mode" in _verify(good.replace("KillMode=process", "KillMode=bogus"), tmp_path).stderr


def test_render_refuses_bad_paths():
    for path in ("relative/cove", "/with space/cove", "/a|b/cove"):
        done = subprocess.run([str(RENDER), path], capture_output=True, text=True)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert (
        "setup" in (ROOT / "scripts" / "setup").read_text()
        and "deploy/systemd/render" in (ROOT / "scripts" / "setup").read_text()
    )
