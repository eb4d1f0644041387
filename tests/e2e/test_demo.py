"""`cove demo`, the README's first command: it must work on a machine after scripts/setup alone."""

from __future__ import annotations

from tests.conftest import error_line


def test_demo_runs_and_says_what_it_proved(cove, tmp_path):
    result = cove("demo", "--dir", str(tmp_path / "demo"), timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "403 NotExportable" in out
    assert "DB_PASSWORD has 32 characters" in out
    assert "released demo/db/password@1 to measurement" in out
    assert "PolicyDeny" in out and "a different enclave is refused before its program starts" in out
    assert out.count("proved:") >= 5
    # the encrypted volume, keyed by the broker (the secure file system serves encrypted mounts)
    assert "wrote /data/ledger.txt" in out and "read back: customer ledger" in out
    assert "released demo/volume/key@1" in out and "holds only ciphertext" in out
    raw = b"".join(p.read_bytes() for p in (tmp_path / "demo" / "app" / "run").rglob("*") if p.is_file())
    assert raw and b"alice owes bob" not in raw
    assert "Traceback" not in result.stderr


def test_demo_without_dir_cleans_up(cove, tmp_path):
    result = cove("demo", timeout=600, env={"TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.glob("cove-demo-*"))


def test_demo_error_is_one_line(cove, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = cove("demo", "--dir", str(blocker / "sub"))
    assert result.returncode != 0
    error_line(result)
