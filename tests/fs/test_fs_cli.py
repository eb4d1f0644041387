"""cove fs: encrypt, decrypt, verify, ls, mount, forget, on the real command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cove.fs import ProtectedFile
from cove.fs.volume import Volume
from tests.conftest import COVE, error_line, require

from securefs_helpers import build_tamper_volume, flip

VECTORS = Path(__file__).parent / "vectors"


@pytest.fixture
def env(tmp_path, monkeypatch):
    platform = tmp_path / "platform"
    monkeypatch.setenv("COVE_PLATFORM_DIR", str(platform))
    return {"COVE_PLATFORM_DIR": str(platform)}


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "k.key"
    path.write_bytes(os.urandom(16))
    return path


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "plain"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "hello.txt").write_text("hello\n")
    (src / "sub" / "data.bin").write_bytes(os.urandom(300_000))
    (src / "sub" / "deeper" / "empty").write_bytes(b"")
    os.chmod(src / "sub" / "data.bin", 0o600)
    os.symlink("sub/data.bin", src / "link")
    return src


def _same_tree(a: Path, b: Path) -> None:
    names_a = sorted(str(p.relative_to(a)) for p in a.rglob("*"))
    names_b = sorted(str(p.relative_to(b)) for p in b.rglob("*"))
    assert names_a == names_b
    for name in names_a:
        pa, pb = a / name, b / name
        assert pa.is_symlink() == pb.is_symlink()
        if pa.is_symlink():
            assert os.readlink(pa) == os.readlink(pb)
        elif pa.is_file():
            assert pa.read_bytes() == pb.read_bytes(), name
            assert (pa.stat().st_mode & 0o7777) == (pb.stat().st_mode & 0o7777), name


def test_volume_round_trip(cove, tmp_path, env, key_file, tree):
    key = f"file:{key_file}"
    made = cove.ok("fs", "encrypt", "--key", key, "--label", "/data", str(tree), str(tmp_path / "vol"), env=env)
    assert (
        "created volume" in made.stdout
        and ": 3 files, 300006 bytes" in made.stdout
        and "rollback anchor file" in made.stdout
    )
    listing = cove.ok("fs", "ls", "--key", key, str(tmp_path / "vol"), env=env).stdout
    assert "/sub/data.bin" in listing and "-rw-------       300000" in listing
    assert "/link -> sub/data.bin" in listing
    verified = cove.ok("fs", "verify", "--key", key, str(tmp_path / "vol"), env=env).stdout
    assert verified.startswith(f"ok: {tmp_path / 'vol'}: 3 files, 300006 bytes") and "label /data" in verified
    cove.ok("fs", "decrypt", "--key", key, str(tmp_path / "vol"), str(tmp_path / "out"), env=env)
    _same_tree(tree, tmp_path / "out")
    blob = b"".join(p.read_bytes() for p in (tmp_path / "vol").rglob("*") if p.is_file())
    assert b"hello" not in blob and b"data.bin" not in blob


def test_single_file_round_trip_and_gramine_binding(cove, tmp_path, key_file):
    src = tmp_path / "plain.bin"
    src.write_bytes(os.urandom(70_000))
    out = tmp_path / "enc.pf"
    made = cove.ok("fs", "encrypt", "--key", f"file:{key_file}", "--path", "/app/data.bin", str(src), str(out))
    assert "bound to '/app/data.bin'" in made.stdout
    with ProtectedFile.open(out, key_file.read_bytes(), "/app/data.bin") as pf:  # what Gramine would open
        assert pf.read(0, 1 << 20) == src.read_bytes()
    cove.ok("fs", "decrypt", "--key", f"file:{key_file}", str(out), str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == src.read_bytes()
    wrong = cove("fs", "decrypt", "--key", f"file:{key_file}", "--path", "/other", str(out), str(tmp_path / "x"))
    assert wrong.returncode == 3 and "path mismatch" in error_line(wrong)
    assert not (tmp_path / "x").exists()


def test_gramine_written_files_decrypt(cove, tmp_path):
    spec = json.loads((VECTORS / "vectors.json").read_text())
    key = "insecure:" + spec["key"]
    for vector in spec["vectors"]:
        out = tmp_path / vector["file"]
        result = cove.ok("fs", "decrypt", "--key", key, str(VECTORS / vector["file"]), str(out))
        assert f"bound to '{spec['logical_path']}'" in result.stdout
        assert out.stat().st_size == vector["size"]
        assert out.read_bytes() == bytes((7 * i + 3) % 251 for i in range(vector["size"]))


def test_tamper_suite_on_the_cli(cove, tmp_path, env):
    key = os.urandom(16)
    (tmp_path / "k").write_bytes(key)
    expected = build_tamper_volume(tmp_path / "vol", key, "/data")
    result = cove("fs", "verify", "--key", f"file:{tmp_path / 'k'}", str(tmp_path / "vol"), env=env, timeout=600)
    assert result.returncode == 3
    line = error_line(result)
    bad = {p for p, outcome in expected.items() if outcome == "bad"}
    assert f"{len(bad) + 1} problem(s)" in line  # every bad file, plus the file added from outside
    failed = [ln[len("FAILED ") :] for ln in result.stdout.splitlines() if ln.startswith("FAILED ")]
    assert {ln.split(":")[0] for ln in failed if ln.startswith("/")} == bad
    assert sum("added from outside" in ln for ln in failed) == 1
    # decrypt refuses the damaged volume and writes nothing
    out = cove(
        "fs",
        "decrypt",
        "--key",
        f"file:{tmp_path / 'k'}",
        str(tmp_path / "vol"),
        str(tmp_path / "out"),
        env=env,
        timeout=600,
    )
    assert out.returncode == 3 and not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_volume_rollback_on_the_cli(cove, tmp_path, env, key_file, tree):
    key = f"file:{key_file}"
    cove.ok("fs", "encrypt", "--key", key, str(tree), str(tmp_path / "vol"), env=env)
    shutil.copytree(tmp_path / "vol", tmp_path / "old")
    with Volume.open(tmp_path / "vol", key_file.read_bytes()) as volume:
        volume.write_file("/hello.txt", b"changed")
    shutil.rmtree(tmp_path / "vol")
    shutil.copytree(tmp_path / "old", tmp_path / "vol")
    result = cove("fs", "verify", "--key", key, str(tmp_path / "vol"), env=env)
    assert result.returncode == 3
    assert "volume rolled back" in error_line(result)
    unchecked = cove("fs", "ls", "--key", key, "--no-rollback-check", str(tmp_path / "vol"), env=env)
    assert unchecked.returncode == 0 and "warning: the rollback check is skipped" in unchecked.stderr


@pytest.mark.parametrize(
    "case",
    [
        "missing-input",
        "output-exists",
        "wrong-key",
        "missing-key-file",
        "bad-key-source",
        "tampered-file",
        "seal-without-instance",
        "not-a-volume",
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(cove, tmp_path, env, key_file, tree, case):
    key = f"file:{key_file}"
    src, out = tree, tmp_path / "out"
    args = ["encrypt", "--key", key, str(src), str(out)]
    if case == "missing-input":
        args[3] = str(tmp_path / "nothing")
        words = "no such file or folder"
    elif case == "output-exists":
        out.mkdir()
        words = "already exists"
    elif case == "wrong-key":
        cove.ok("fs", "encrypt", "--key", key, str(src), str(tmp_path / "vol"), env=env)
        (tmp_path / "other.key").write_bytes(os.urandom(16))
        args = ["decrypt", "--key", f"file:{tmp_path / 'other.key'}", str(tmp_path / "vol"), str(out)]
        words = "the key does not open this volume"
    elif case == "missing-key-file":
        args[2] = f"file:{tmp_path / 'none.key'}"
        words = "not found"
    elif case == "bad-key-source":
        args[2] = "vault:x"
        words = "unknown key source kind"
    elif case == "tampered-file":
        cove.ok("fs", "encrypt", "--key", key, str(src / "hello.txt"), str(tmp_path / "f.pf"))
        flip(tmp_path / "f.pf", 100)
        args = ["decrypt", "--key", key, str(tmp_path / "f.pf"), str(out)]
        words = "metadata MAC mismatch"
    elif case == "seal-without-instance":
        args[2] = "seal:mrsigner"
        words = "cove.toml"
    else:
        (tmp_path / "plainfolder").mkdir()
        args = ["ls", "--key", key, str(tmp_path / "plainfolder")]
        words = "is not a Cove volume"
    result = cove("fs", *args, env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert words in error_line(result), result.stderr
    if case != "output-exists":
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and "cove-tmp" in p.name]


def test_sealed_keys_come_from_the_instance(cove, tmp_path, env, tree):
    from tests.e2e.helpers import make_instance

    app = make_instance(cove, tmp_path, build=False)
    cove.ok("build", cwd=app, env=env)
    made = cove.ok(
        "-C",
        str(app),
        "fs",
        "encrypt",
        "--key",
        "seal:mrsigner",
        "--label",
        "/data",
        str(tree),
        str(tmp_path / "vol"),
        env=env,
    )
    assert "created volume" in made.stdout
    listing = cove.ok("-C", str(app), "fs", "ls", "--key", "seal:mrsigner", str(tmp_path / "vol"), env=env)
    assert "/hello.txt" in listing.stdout
    other = cove("-C", str(app), "fs", "ls", "--key", "seal:mrenclave", str(tmp_path / "vol"), env=env)
    assert "comes from seal:mrsigner, not seal:mrenclave" in error_line(other)


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under root: file bytes, link targets, folders (names and modes)."""
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        mode = oct(path.lstat().st_mode)
        if path.is_symlink():
            out[name] = f"link {os.readlink(path)} {mode}"
        elif path.is_dir():
            out[name] = f"dir {mode}"
        else:
            out[name] = path.read_bytes() + mode.encode()
    return out


def test_read_only_commands_change_nothing(cove, tmp_path, env, tree):
    """decrypt, verify and ls take no writer lock and never re-wrap, even with a seal: key from a higher svn."""
    import fcntl

    from tests.e2e.helpers import make_instance, set_option

    app = make_instance(cove, tmp_path, build=False)
    set_option(app / "cove.toml", "enclave", "svn", "1")
    cove.ok("build", cwd=app, env=env)
    vol = tmp_path / "vol"
    cove.ok("-C", str(app), "fs", "encrypt", "--key", "seal:mrsigner", "--label", "/data", str(tree), str(vol), env=env)
    set_option(app / "cove.toml", "enclave", "svn", "2")  # a newer enclave, whose writable open would re-wrap
    cove.ok("build", cwd=app, env=env)
    before = _snapshot(vol)
    reader = os.open(vol, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(reader, fcntl.LOCK_SH)  # another reader is there: read-only commands share with it
    try:
        for args in (["verify"], ["ls"], ["decrypt"]):
            extra = [str(tmp_path / "out")] if args == ["decrypt"] else []
            result = cove.ok("-C", str(app), "fs", *args, "--key", "seal:mrsigner", str(vol), *extra, env=env)
            assert "Traceback" not in result.stderr
            assert _snapshot(vol) == before, f"cove fs {args[0]} changed the volume"
    finally:
        os.close(reader)
    _same_tree(tree, tmp_path / "out")


def test_read_only_commands_leave_an_interrupted_commit_alone(cove, tmp_path, env, key_file, tree):
    """Leftovers a crash leaves (an old next root, a half-created file) stay for the next writable open."""
    from cove.fs.volume_format import NEXT, ROOT

    key = f"file:{key_file}"
    vol = tmp_path / "vol"
    cove.ok("fs", "encrypt", "--key", key, "--rollback", "none", str(tree), str(vol), env=env)
    (vol / NEXT).write_bytes((vol / ROOT).read_bytes())  # a stale next root
    sub = next(p for p in (vol / "files").iterdir() if p.is_dir())
    (sub / ".half.cove-new").write_bytes(b"a creation a crash interrupted")
    before = _snapshot(vol)
    for args in (["verify", str(vol)], ["ls", str(vol)], ["decrypt", str(vol), str(tmp_path / "out")]):
        cove.ok("fs", args[0], "--key", key, *args[1:], env=env)
        assert _snapshot(vol) == before, f"cove fs {args[0]} changed the volume"
    with Volume.open(vol, key_file.read_bytes()):  # a writable open finishes the job
        pass
    assert not (vol / NEXT).exists() and not (sub / ".half.cove-new").exists()


def test_mount_on_the_host(cove, tmp_path, env, key_file, tree):
    require("fusermount3")
    key = f"file:{key_file}"
    cove.ok("fs", "encrypt", "--key", key, str(tree), str(tmp_path / "vol"), env=env)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        [COVE, "fs", "mount", "--key", key, str(tmp_path / "vol"), str(mnt)],
        env=dict(cove.env, **env),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert (mnt / "hello.txt").read_text() == "hello\n"
        assert sorted(os.listdir(mnt)) == ["hello.txt", "link", "sub"]
        (mnt / "new.txt").write_text("written on the host")
        busy = cove("fs", "verify", "--key", key, str(tmp_path / "vol"), env=env)
        assert "is in use" in error_line(busy)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        proc.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr.read()
    with Volume.open(tmp_path / "vol", key_file.read_bytes()) as volume:
        assert volume.read_file("/new.txt") == b"written on the host"


def test_forget(cove, tmp_path, env, key_file, tree):
    key = f"file:{key_file}"
    cove.ok("fs", "encrypt", "--key", key, str(tree), str(tmp_path / "vol"), env=env)
    assert "still holds a volume" in error_line(cove("fs", "forget", str(tmp_path / "vol"), env=env))
    shutil.rmtree(tmp_path / "vol")
    assert "forgot 1 record" in cove.ok("fs", "forget", str(tmp_path / "vol"), env=env).stdout
    assert "no record" in error_line(cove("fs", "forget", str(tmp_path / "vol"), env=env))
