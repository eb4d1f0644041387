"""Encrypted mounts on the vm backend: the host's secure file system server, exported over virtio-fs.

One instance booted four times, and one more boot for a broker-released key
(each TCG boot costs seconds of CPU), so each boot asks several things: the
guest's ids stored as on sim, escapes out of the mount, virtiofsd's
confinement, rollback and tamper refusals, read-only mounts, and nothing
left behind after a `kill -9` of QEMU or of the launcher.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from cove import hostids
from cove.runtime import vm_shared
from tests.conftest import error_line, require
from tests.e2e.helpers import make_instance
from tests.e2e.test_kbs_provisioning import VOLUME, broker, platform_env, release_to, secrets_config  # noqa: F401
from tests.e2e.test_vm import _qemu_children, _wait_for
from tests.fs.securefs_enclave import mount_block
from tests.fs.securefs_enclave import platform_env as platform_folder

SENTINEL = b"host-only sentinel 5f1d"
TOOLS = ("/bin/ln", "/bin/mkdir", "/usr/bin/stat", "/bin/grep")


@pytest.fixture(scope="module")
def instance(cove, tmp_path_factory) -> tuple[Path, dict]:
    require("qemu-system-x86_64")
    if not os.access(vm_shared.VIRTIOFSD, os.X_OK):
        pytest.fail(f"{vm_shared.VIRTIOFSD} is missing: run scripts/setup (qemu-system-x86)", pytrace=False)
    base = tmp_path_factory.mktemp("vm-mounts")
    env = platform_folder(base)
    root = make_instance(
        cove,
        base,
        options={("enclave", "backend"): '"vm"', ("process", "user"): '"1000:1000"'},
        extra=mount_block(key="seal:mrsigner", options='rollback = "file"'),
        build=False,
    )
    cove.ok("add", *TOOLS, cwd=root)
    cove.ok("build", cwd=root, env=env)
    return root, env


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _named_children(pid: int, comm: str) -> list[int]:
    return [c for c in _children(pid) if Path(f"/proc/{c}/comm").read_text().strip() == comm]


def _gone(pids: list[int]) -> None:
    for pid in pids:
        _wait_for(
            lambda pid=pid: not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text(),
            timeout=10,
        )


def _virtiofsd(launcher: int) -> list[int]:
    """virtiofsd processes under LAUNCHER: each mount's, and the sandboxed child each forks."""
    found = _named_children(launcher, "virtiofsd")
    return found + [c for pid in found for c in _children(pid)]


def test_guest_reads_and_writes_as_on_sim_and_cannot_leave_the_mount(cove, instance):
    root, env = instance
    volume = root / "run" / "data"
    (root / "run").mkdir(exist_ok=True)
    (root / "run" / "sentinel").write_bytes(SENTINEL)  # next to the volume, on the host
    script = (
        "echo hello > /data/f && echo one > /data/v && mkdir /data/d && echo deep > /data/d/y && "
        "stat -c %u:%g /data/f && cat /data/d/y; "
        # ways out: dot-dot, symbolic links to the host's paths and above the mount, a host-absolute path
        f"ln -s ../../../../../../../sentinel /data/up; ln -s {root}/run/sentinel /data/abs; ln -s .. /data/parent; "
        f"cat /data/../sentinel /data/up /data/abs /data/parent/sentinel /data/parent/../sentinel "
        f"{root}/run/sentinel 2>&1; ls /data/parent/; echo end"
    )
    result = cove("run", "/bin/sh", "-c", script, cwd=root, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["1000:1000", "deep"]  # the guest's ids, stored as on sim
    assert SENTINEL.decode() not in result.stdout and lines[-1] == "end"
    assert "data" in result.stdout.split()  # /data/parent is the guest's own root
    # the host holds only ciphertext
    blob = b"".join(p.read_bytes() for p in volume.rglob("*") if p.is_file())
    assert b"hello" not in blob and b"deep" not in blob and len(blob) > 0


def test_virtiofsd_is_confined_and_a_rolled_back_volume_is_refused(cove, instance, tmp_path):
    root, env = instance
    volume = root / "run" / "data"
    shutil.copytree(volume, tmp_path / "old")
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    run = subprocess.Popen(
        cove.popen_args("run", "/bin/sh", "-c", "echo two > /data/v; echo ready; read go; cat /data/v"),
        cwd=root,
        env=dict(cove.env, COVE_RUNTIME_DIR=str(runtime), **env),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert run.stdout.readline() == "ready\n", run.communicate(timeout=60)
        parents = _named_children(run.pid, "virtiofsd")
        assert len(parents) == 1, [Path(f"/proc/{p}/cmdline").read_bytes() for p in parents]
        sandboxed = _children(parents[0])
        assert len(sandboxed) == 1
        for pid in parents + sandboxed:
            status = Path(f"/proc/{pid}/status").read_text()
            uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
            assert "0" not in uids  # never host root: the enclave's subordinate ids
            uid_map = Path(f"/proc/{pid}/uid_map").read_text().split()
            assert uid_map[0] == "0" and uid_map[1] != "0"
        child = sandboxed[0]
        # its own mount, pid and network namespaces, and its root is the volume's plaintext view
        for kind in ("mnt", "pid", "net", "user"):
            assert os.readlink(f"/proc/{child}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}"), kind
        assert sorted(os.listdir(f"/proc/{child}/root")) == ["abs", "d", "f", "parent", "up", "v"]
        assert "Seccomp:\t2" in Path(f"/proc/{child}/status").read_text()
        (sock,) = runtime.glob("cove-enclave-*/vm-*/cove-fs0.sock")  # QEMU's end of virtiofsd: private
        assert (sock.stat().st_mode & 0o777, sock.parent.stat().st_mode & 0o777) == (0o600, 0o700)
        run.stdin.write("go\n")
        run.stdin.flush()
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert (run.returncode, out) == (0, "two\n"), err
    # the volume put back as it was before that run: refused before the guest boots, as on sim
    shutil.move(volume, tmp_path / "new")
    shutil.copytree(tmp_path / "old", volume)
    result = cove("run", "/bin/cat", "/data/v", cwd=root, env=env)
    assert result.returncode == 3 and result.stdout == ""
    line = error_line(result)
    assert "encrypted mount /data: volume rolled back" in line and "file anchor" in line
    shutil.rmtree(volume)
    shutil.move(tmp_path / "new", volume)


def test_tampered_volume_fails_inside_and_a_killed_qemu_leaves_nothing(cove, instance, tmp_path):
    root, env = instance
    volume = root / "run" / "data"
    saved = tmp_path / "saved"
    shutil.copytree(volume, saved)
    for blob in (volume / "files").rglob("*"):
        if blob.is_file():
            data = bytearray(blob.read_bytes())
            data[len(data) // 2] ^= 0x40
            blob.write_bytes(bytes(data))
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    run = subprocess.Popen(
        cove.popen_args("run", "/bin/sh", "-c", "ls /data; cat /data/f; echo status $?; echo ready; sleep 600"),
        cwd=root,
        env=dict(cove.env, COVE_RUNTIME_DIR=str(runtime), **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        while (line := run.stdout.readline()) not in ("ready\n", ""):
            lines.append(line.strip())
        assert lines[-1] == "status 1" and "f" in lines[:-1], (lines, run.stderr if run.poll() is not None else "")
        shared = _virtiofsd(run.pid)
        qemu = _qemu_children(run.pid)
        assert len(shared) == 2 and len(qemu) == 1
        os.kill(qemu[0], signal.SIGKILL)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert "Input/output error" in err  # the guest's cat, on the stderr the guest streams
    assert run.returncode != 0 and "without the program's exit code" in err and "Traceback" not in err
    _gone(shared)  # virtiofsd and its sandbox end with QEMU
    assert os.listdir(runtime) == []  # no private folder, socket or FUSE mount left behind
    assert str(runtime) not in Path("/proc/self/mountinfo").read_text()
    # a changed byte in the volume's root record: refused before the guest boots, as on sim
    shutil.rmtree(volume)
    shutil.copytree(saved, volume)
    record = bytearray((volume / "root").read_bytes())
    record[len(record) // 2] ^= 0x01
    (volume / "root").write_bytes(bytes(record))
    refused = cove("run", "/bin/cat", "/data/f", cwd=root, env=env)
    assert refused.returncode == 3 and refused.stdout == ""
    assert "encrypted mount /data" in error_line(refused)
    shutil.rmtree(volume)
    shutil.copytree(saved, volume)


def test_read_only_mount_and_kill_9_of_the_launcher_leaves_no_virtiofsd(cove, instance, tmp_path):
    root, env = instance
    config = root / "cove.toml"
    original = config.read_text()
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    try:
        config.write_text(original.replace('key = "seal:mrsigner"\n', 'key = "seal:mrsigner"\nwritable = false\n'))
        cove.ok("build", cwd=root, env=env)
        script = "cat /data/f; echo x > /data/g; grep virtiofs /proc/mounts; echo ready; sleep 600"
        run = subprocess.Popen(
            cove.popen_args("run", "/bin/sh", "-c", script),
            cwd=root,
            env=dict(cove.env, COVE_RUNTIME_DIR=str(runtime), **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            lines = []
            while (line := run.stdout.readline()) not in ("ready\n", ""):
                lines.append(line)
            assert lines[0] == "hello\n" and " /data virtiofs ro," in lines[1], lines
            shared = _virtiofsd(run.pid)
            qemu = _qemu_children(run.pid)
            assert len(shared) == 2 and len(qemu) == 1
            run.send_signal(signal.SIGKILL)  # the launcher itself
            _, err = run.communicate(timeout=30)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
        assert "Read-only file system" in err
        _gone(shared + qemu)  # virtiofsd, its sandbox and QEMU die with the launcher
        # and the volume's FUSE server with them: no mount left in the killed launcher's folder
        _wait_for(lambda: str(runtime) not in Path("/proc/self/mountinfo").read_text(), timeout=10)
    finally:
        config.write_text(original)
        cove.ok("build", cwd=root, env=env)


def test_a_broker_released_key_opens_the_volume_and_a_refused_one_boots_nothing(cove, tmp_path, broker, platform_env):
    """The key of a `kbs:` mount is released after attestation with the vTPM-bound evidence, as on sim."""
    instance = make_instance(
        cove, tmp_path, options={("enclave", "backend"): '"vm"'}, extra=secrets_config(broker.url, broker.ca) + VOLUME
    )
    release_to(broker, instance)
    broker.admin.create_secret("app/db/password", "data", "app", value=b"pw")
    broker.admin.create_secret("app/api/token", "data", "app", value=b"tok")
    broker.admin.create_secret("app/volume/key", "aes-256", "app", exportable=False)
    result = cove(
        "run", "/bin/sh", "-c", "echo 'top secret ledger' > /data/l; cat /data/l", cwd=instance, env=platform_env
    )
    assert (result.returncode, result.stdout) == (0, "top secret ledger\n"), result.stderr
    raw = b"".join(p.read_bytes() for p in (instance / "run").rglob("*") if p.is_file())
    assert raw and b"top secret ledger" not in raw
    releases = [r["resource"] for r in broker.admin.audit(action="release") if r["outcome"] == "ok"]
    assert releases.count("app/volume/key@1") == 1
    broker.admin.put_policy(
        "app", 'types = ["cove"]\n[cove]\nmeasurements = ["' + "00" * 32 + '"]\nself_certified = true\n'
    )
    refused = cove("run", "/bin/cat", "/data/l", cwd=instance, env=platform_env)
    assert refused.returncode != 0 and refused.stdout == "" and "PolicyDeny" in error_line(refused)


def test_started_by_another_user_a_non_root_program_is_refused_before_boot(user_cove):
    """virtiofsd's namespace has only that user's id then: a program of other ids is refused in one line."""
    if user_cove.uid == 0:
        pytest.fail("user_cove must be an unprivileged account", pytrace=False)
    root = make_instance(
        user_cove,
        user_cove.workdir,
        name="vm-mounts",
        options={("enclave", "backend"): '"vm"', ("process", "user"): '"1000:1000"'},
        extra=mount_block(key="seal:mrsigner"),
    )
    result = user_cove("run", "/bin/cat", "/data/f", cwd=root)
    assert result.returncode == 2 and result.stdout == ""
    line = error_line(result)
    assert "the program's ids 1000:1000 have no host ids for virtiofsd" in line and 'user = "root"' in line


def test_a_virtiofsd_that_fails_stops_the_start_in_one_line_and_leaves_nothing(cove, instance, tmp_path):
    root, env = instance
    folder = Path(tempfile.mkdtemp())  # reachable by the enclave's ids, which virtiofsd runs as
    try:
        folder.chmod(0o755)
        fake = folder / "virtiofsd"
        fake.write_text("#!/bin/sh\necho 'cannot serve this folder' >&2\nexit 1\n")
        fake.chmod(0o755)
        runtime = tmp_path / "runtime"
        runtime.mkdir()
        extra = {"COVE_VIRTIOFSD": str(fake), "COVE_RUNTIME_DIR": str(runtime)}
        result = cove("run", "/bin/cat", "/data/f", cwd=root, env=dict(env, **extra))
    finally:
        shutil.rmtree(folder)
    assert result.returncode != 0 and result.stdout == ""
    assert "virtiofsd: cannot serve this folder" in error_line(result)
    assert os.listdir(runtime) == []


# Host mounts ([[mounts]] type = "host"): the same virtio-fs path with the host folder as the view, under
# sim's rules. One build and one boot; the refusals before boot cost no boot.
HOST_MOUNTS = (
    '\n[[mounts]]\ntarget = "/host"\ntype = "host"\nsource = "{share}"\nwritable = true\n'
    '\n[[mounts]]\ntarget = "/ro"\ntype = "host"\nsource = "{ro}"\n'
)


@pytest.fixture(scope="module")
def host_instance(cove, tmp_path_factory) -> tuple[Path, dict, Path]:
    """A vm enclave with a writable host folder at /host (the enclave's host user's) and a read-only one
    at /ro; next to them, a sentinel no escape may reach."""
    require("qemu-system-x86_64")
    if not os.access(vm_shared.VIRTIOFSD, os.X_OK):
        pytest.fail(f"{vm_shared.VIRTIOFSD} is missing: run scripts/setup (qemu-system-x86)", pytrace=False)
    base = tmp_path_factory.mktemp("vm-host-mounts")
    env = platform_folder(base)
    share, ro = base / "share", base / "ro"
    share.mkdir(0o755)
    ro.mkdir(0o755)
    (ro / "r").write_text("read only\n")
    (base / "sentinel").write_bytes(SENTINEL)
    (share / "hosts").write_text("host root's\n")  # host root's, 0644: readable, never writable
    (share / "private").write_bytes(SENTINEL)
    (share / "private").chmod(0o600)  # host root's only
    os.symlink("../sentinel", share / "up")  # links the host made, out of the folder
    os.symlink(base / "sentinel", share / "abs")
    os.chown(share, *_enclave_user())
    root = make_instance(
        cove,
        base,
        options={("enclave", "backend"): '"vm"', ("process", "user"): '"1000:1000"'},
        extra=HOST_MOUNTS.format(share=share, ro=ro),
        build=False,
    )
    cove.ok("add", *TOOLS, cwd=root)
    cove.ok("build", cwd=root, env=env)
    return root, env, base


def _enclave_user() -> tuple[int, int]:
    """The host ids a root-started enclave writes as (cove.hostids), or the caller's."""
    return hostids.enclave_range().host(0, 0) if os.geteuid() == 0 else (os.getuid(), os.getgid())


def test_host_mount_reads_writes_as_the_enclave_stays_inside_and_dies_with_the_launcher(cove, host_instance):
    root, env, base = host_instance
    share = base / "share"
    script = (
        "echo hi > /host/f && mkdir /host/d && echo deep > /host/d/y && stat -c %u:%g /host/f /host/hosts && "
        "cat /host/hosts /ro/r; echo x >> /host/hosts; cat /host/private; echo x > /ro/g; "
        # ways out: dot-dot, the host's links out of the folder, the guest's own, a host-absolute path
        f"ln -s ../../../../../../../sentinel /host/gup; ln -s {base}/sentinel /host/gabs; ln -s .. /host/parent; "
        f"cat /host/../sentinel /host/up /host/abs /host/gup /host/gabs /host/parent/sentinel {base}/sentinel 2>&1; "
        "ls /host/parent/ | grep -c -x -e host -e ro; grep virtiofs /proc/mounts; echo ready; sleep 600"
    )
    run = subprocess.Popen(
        cove.popen_args("run", "/bin/sh", "-c", script),
        cwd=root,
        env=dict(cove.env, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        while (line := run.stdout.readline()) not in ("ready\n", ""):
            lines.append(line.rstrip("\n"))
        assert lines[:4] == ["1000:1000", "65534:65534", "host root's", "read only"], (lines, run.poll())
        assert SENTINEL.decode() not in "\n".join(lines)
        mounts = [line.split()[1:4] for line in lines if " virtiofs " in line]
        assert [(m[0], m[2].split(",")[0]) for m in mounts] == [("/host", "rw"), ("/ro", "ro")]
        assert lines[-3] == "2"  # /host/parent is the guest's own root, which holds both mounts
        # the guest's files are on the host, the enclave's host user's (never host root's)
        assert (share / "f").read_text() == "hi\n" and (share / "d" / "y").read_text() == "deep\n"
        for made in (share / "f", share / "d", share / "d" / "y", share / "gup"):
            st = made.lstat()
            assert (st.st_uid, st.st_gid) == _enclave_user(), made
        assert (share / "hosts").read_text() == "host root's\n" and not (base / "ro" / "g").exists()
        shared = _virtiofsd(run.pid)
        qemu = _qemu_children(run.pid)
        assert len(shared) == 4 and len(qemu) == 1  # a virtiofsd and its sandbox per mount
        for pid in shared:
            uids = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:"))
            assert "0" not in uids.split()[1:]
        run.send_signal(signal.SIGKILL)  # the launcher itself
        _, err = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert err.count("Permission denied") == 2 and "Read-only file system" in err, err
    _gone(shared + qemu)  # virtiofsd, its sandbox and QEMU die with the launcher


def test_host_mount_sources_are_refused_before_boot_in_one_line(cove, host_instance, tmp_path):
    """As on sim: a missing source, and a writable one the enclave's host user cannot write; nothing starts."""
    root, env, base = host_instance
    share = base / "share"
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    run_env = dict(env, COVE_RUNTIME_DIR=str(runtime))
    uid, gid = _enclave_user()
    try:
        os.chown(share, 0, 0)  # host root's 0755
        refused = cove("run", "/bin/cat", "/host/f", cwd=root, env=run_env)
        assert refused.returncode == 2 and refused.stdout == ""
        line = error_line(refused)
        assert f"host mount source {share} is not writable by the enclave's host user {uid}:{gid}" in line
        assert f"chown {uid}:{gid} {share}" in line
        share.rename(base / "moved")
        missing = cove("run", "/bin/cat", "/host/f", cwd=root, env=run_env)
        assert missing.returncode == 2 and missing.stdout == ""
        assert f"host mount source {share} does not exist" in error_line(missing)
    finally:
        if not share.exists():
            (base / "moved").rename(share)
        os.chown(share, uid, gid)
    assert os.listdir(runtime) == [] and not _qemu_children(os.getpid())
