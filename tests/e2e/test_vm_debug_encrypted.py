"""`cove run --debug-enclave` and `cove build --encrypt-image` on the vm backend, as on sim.

A debug vm enclave runs any program and every report from inside it says
debug, so only a policy that allows debug accepts it. An encrypted vm build
puts no image into its initramfs: the guest's root is the host's verifying,
decrypting view of build/image.enc, served read-only over virtio-fs once the
key is released. Three boots in all (a debug run, an encrypted run, a
tampered one); everything else is refused before boot or needs no boot.
"""

from __future__ import annotations

import fcntl
import os
import pty
import shutil
import struct
import subprocess
import termios
import time
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import cbor2
import pytest

from cove.attest.cove_evidence_verify import verify_cove_evidence
from cove.image import vmimage
from cove.runtime import vm, vm_shared
from tests.conftest import error_line, require
from tests.e2e.helpers import make_instance
from tests.e2e.test_process import _read_until, _reap
from tests.e2e.test_vm import attest_probe, hello  # noqa: F401 (fixtures)

MARKER = "plaintext marker 3c9e of an encrypted vm image"
SCRATCH = '\n[[mounts]]\ntarget = "/scratch"\ntype = "tmpfs"\n'
READ = (
    "/bin/sh",
    "-c",
    "/bin/hello world; cat /etc/app/secret.conf; ls -ln /etc/app; id -u; exit 3",
)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("platform") / "platform"
    folder.mkdir(mode=0o700)
    return {"COVE_PLATFORM_DIR": str(folder)}


@pytest.fixture(scope="module")
def debug_vm(cove, tmp_path_factory, attest_probe, env) -> Path:  # noqa: F811
    require("qemu-system-x86_64")
    root = make_instance(
        cove,
        tmp_path_factory.mktemp("debug"),
        options={
            ("enclave", "backend"): '"vm"',
            ("enclave", "debug"): "true",
            ("process", "entry_points"): '["/bin/attest_probe"]',
        },
        extra=SCRATCH,
        build=False,
    )
    cove.ok("add", "--to", "/bin", str(attest_probe), cwd=root)
    cove.ok("add", "/bin/stty", "/usr/bin/tty", cwd=root)
    cove.ok("build", cwd=root, env=env)
    return root


@pytest.fixture(scope="module")
def encrypted(cove, tmp_path_factory, hello, env) -> dict:  # noqa: F811
    """One image built for sim and for vm with --encrypt-image file:KEY, the plain image/ moved away."""
    require("qemu-system-x86_64")
    require("fusermount3")
    if not os.access(vm_shared.VIRTIOFSD, os.X_OK):
        pytest.fail(f"{vm_shared.VIRTIOFSD} is missing: run scripts/setup (qemu-system-x86)", pytrace=False)
    base = tmp_path_factory.mktemp("encrypted")
    key = base / "image.key"
    key.write_bytes(os.urandom(16))
    built = {"key": key}
    for backend in ("sim", "vm"):
        (base / backend).mkdir()
        root = make_instance(
            cove,
            base / backend,
            options={("enclave", "backend"): f'"{backend}"', ("process", "user"): '"1000:1000"'},
            extra=SCRATCH,
            build=False,
        )
        cove.ok("add", "--to", "/bin", str(hello), cwd=root)
        (root / "image" / "etc" / "app").mkdir(parents=True)
        (root / "image" / "etc" / "app" / "secret.conf").write_text(MARKER + "\n")
        # the largest file, so that a flipped byte of the largest ciphertext file lands in it
        (root / "image" / "etc" / "app" / "big").write_bytes(MARKER.encode() + os.urandom(3 << 20))
        cove.ok("build", "--encrypt-image", f"file:{key}", cwd=root, env=env)
        shutil.move(root / "image", base / f"{backend}-plain-image")
        built[backend] = root
    return built


def test_debug_vm_runs_any_program_and_its_evidence_verifies_only_where_debug_is_allowed(cove, debug_vm, env, tmp_path):
    data = os.urandom(64)
    refused = cove("run", "/bin/sh", "-c", "echo no", cwd=debug_vm, env=env)
    assert refused.returncode == 2 and "not an entry point" in error_line(refused)
    run = cove(
        "run",
        "--debug-enclave",
        "/bin/sh",
        "-c",
        f"echo from a debug vm; /bin/attest_probe quote {data.hex()}",
        cwd=debug_vm,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "from a debug vm"
    claims = verify_cove_evidence(bytes.fromhex(lines[1]), datetime.now(timezone.utc))
    assert claims.report.debug and claims.report.backend == "vm" and claims.report.report_data == data
    evidence = tmp_path / "evidence.hex"
    evidence.write_text(lines[1])
    default = tmp_path / "default.toml"
    default.write_text('[cove]\nself_certified = true\nbackends = ["vm"]\n')
    result = cove("verify", evidence, "--report-data", data.hex(), "--policy", default)
    assert result.returncode == 6 and "debug" in error_line(result)
    allows = tmp_path / "debug.toml"
    allows.write_text('[cove]\nself_certified = true\nbackends = ["vm"]\ndebug = true\n')
    result = cove("verify", evidence, "--report-data", data.hex(), "--policy", allows)
    assert result.returncode == 0, result.stderr


def test_a_debug_shell_at_a_terminal_gets_a_terminal_in_the_guest(cove, debug_vm, env):
    """At the user's terminal the guest gives the program one of its own, as sim does: sized as the
    user's, resized with it, with the line discipline (Ctrl-C) inside, and the exit code comes back."""
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(debug_vm)
        os.execve(cove.popen_args()[0], cove.popen_args("run", "--debug-enclave", "/bin/sh", "-i"), {**cove.env, **env})
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # before cove reads it
    seen = bytearray()
    try:
        os.write(fd, b"stty size; tty; echo go-$((6*7))\n")
        _read_until(fd, b"go-42", seen, 60)
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # cove gets SIGWINCH
        time.sleep(1)
        os.write(fd, b"sleep 30\n")
        time.sleep(1)
        os.write(fd, b"\x03")  # the guest's line discipline: SIGINT to the foreground job, not the shell
        os.write(fd, b"stty size; echo back-$((6*7)); exit 5\n")
        _read_until(fd, b"back-42", seen, 60)
    finally:
        status = _reap(pid, 60)
        os.close(fd)
    out = bytes(seen).decode(errors="replace")
    assert "30 100" in out and "/dev/pts/0" in out and "40 120" in out, out
    assert "job control turned off" not in out and "not a tty" not in out, out
    assert os.waitstatus_to_exitcode(status) == 5, out


def test_a_debug_vm_enclave_is_not_packaged_without_debug_enclave(cove, debug_vm, env, tmp_path):
    """(A vm package itself: test_an_encrypted_vm_build_carries_no_plaintext; --debug-enclave lets
    package_mod.create go on whatever the backend, tests/e2e/test_package.py.)"""
    result = cove("package", "--output", tmp_path / "a.tar.gz", cwd=debug_vm, env=env)
    assert result.returncode == 2 and "refusing to package a debug enclave" in error_line(result)
    assert not (tmp_path / "a.tar.gz").exists()


def test_a_vm_enclave_that_is_not_debug_refuses_debug_enclave(cove, encrypted, env):
    result = cove("run", "--debug-enclave", "/bin/sh", "-c", "echo no", cwd=encrypted["vm"], env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert "--debug-enclave needs a debug enclave" in error_line(result)


def test_an_encrypted_vm_build_carries_no_plaintext(cove, encrypted, env, tmp_path):
    root = encrypted["vm"]
    initrd = (root / "build" / "vm" / vmimage.INITRD).read_bytes()
    assert MARKER.encode() not in initrd and b"secret.conf" not in initrd and b"image/bin" not in initrd
    description = cbor2.loads((root / "build" / "vm" / vmimage.LAUNCH).read_bytes())
    assert vmimage.ROOT_DEVICE in description["devices"] and vmimage.encrypted_root(description)
    cove.ok("package", "--output", tmp_path / "vm.tar.gz", cwd=root, env=env)
    with tarfile.open(tmp_path / "vm.tar.gz") as archive:
        names = archive.getnames()
        blob = b"".join(archive.extractfile(m).read() for m in archive.getmembers() if m.isfile())  # type: ignore[union-attr]
    assert "build/vm/initrd.cpio" in names and not any(n.startswith("image/") for n in names)
    assert MARKER.encode() not in blob


def test_an_encrypted_vm_enclave_runs_as_on_sim_and_a_wrong_key_is_refused(cove, encrypted, env):
    on_sim = cove("run", *READ, cwd=encrypted["sim"], env=env)
    on_vm = cove("run", *READ, cwd=encrypted["vm"], env=env)
    assert f"\n{MARKER}\n" in on_vm.stdout and "secret.conf" in on_vm.stdout and on_vm.returncode == 3, on_vm.stderr
    assert (on_vm.returncode, on_vm.stdout) == (on_sim.returncode, on_sim.stdout), (on_vm.stderr, on_sim.stderr)
    key, right = encrypted["key"], encrypted["key"].read_bytes()
    key.write_bytes(os.urandom(16))
    try:
        wrong = cove("run", *READ, cwd=encrypted["vm"], env=env)
    finally:
        key.write_bytes(right)
    assert wrong.returncode == 3 and wrong.stdout == ""
    assert "the key does not open this volume" in error_line(wrong)


def test_tampered_ciphertext_fails_the_read_in_the_guest(cove, encrypted, env):
    volume = encrypted["vm"] / "build" / "image.enc"
    victim = max((p for p in volume.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    original = victim.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    try:
        result = cove(
            "run",
            "/bin/sh",
            "-c",
            "cat /etc/app/big > /dev/null || echo read-failed; cat /etc/app/big > /dev/null || echo again",
            cwd=encrypted["vm"],
            env=env,
        )
    finally:
        victim.write_bytes(original)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "read-failed\nagain\n" and MARKER not in result.stdout
    assert "Input/output error" in result.stderr


def test_the_root_item_and_device(tmp_path):
    """Without a boot: the launch request names the root's tag, QEMU gets its vhost-user device."""
    description = vmimage.describe(b"k" * 32, b"i" * 32, 1 << 20, _config(), encrypted_root=True)
    assert description["devices"][-2:] == [vmimage.SHARED_MEMORY, vmimage.ROOT_DEVICE]
    assert not vmimage.encrypted_root(vmimage.describe(b"k" * 32, b"i" * 32, 1 << 20, _config()))
    args = vm.qemu_arguments(
        description, tmp_path / "k", tmp_path / "i", "tcg", tmp_path / "c", [3, 4, 5, 6, 7], {vmimage.ROOT_TAG: 9}
    )
    assert f"vhost-user-fs-pci,chardev={vmimage.ROOT_TAG},tag={vmimage.ROOT_TAG}" in args
    assert f"socket,id={vmimage.ROOT_TAG},fd=9" in args


def _config():
    from cove import config as cove_config

    return cove_config.parse('[enclave]\nname = "t"\nbackend = "vm"\n')


ROOT_ITEM_TEST = r"""#define _GNU_SOURCE
#include <sys/reboot.h>
#define reboot(how) 0 /* die() must not reboot the machine running the test */
#define main cove_init_main
#include "INIT"
#undef main
int main(int argc, char **argv) {  /* parse a request of the items in argv; print root tag and terminal */
    static char body[4096];
    size_t len = 0;
    for (int i = 1; i < argc; i++) {
        size_t n = strlen(argv[i]) + 1;
        memcpy(body + len, argv[i], n);
        len += n;
    }
    static struct request r;
    parse(body, len, &r);
    printf("%s %d %u %u\n", r.root ? r.root : "(initramfs)", r.tty, r.rows, r.cols);
    return 0;
}
"""


def test_the_guest_root_and_terminal_items_are_strict(tmp_path):
    """The init's O item: one, not empty; without it the root is the initramfs's /image. Its M item:
    one, ROWS:COLS of 1 to 5 digits each, at most 65535."""
    require("gcc")
    (tmp_path / "t.c").write_text(ROOT_ITEM_TEST.replace("INIT", str(vmimage.INIT_SOURCE)))
    subprocess.run(["gcc", "-O2", "-o", str(tmp_path / "t"), str(tmp_path / "t.c")], check=True)

    def parse(*items: str) -> tuple[int, str, str]:
        done = subprocess.run([str(tmp_path / "t"), "A/bin/x", *items], capture_output=True, text=True)
        return done.returncode, done.stdout, done.stderr

    assert parse() == (0, "(initramfs) 0 0 0\n", "")
    assert parse("Ocove-root", "Ycove") == (0, "cove-root 0 0 0\n", "")
    assert parse("M24:80") == (0, "(initramfs) 1 24 80\n", "")
    assert parse("M65535:00001") == (0, "(initramfs) 1 65535 1\n", "")
    for bad in (("O",), ("Ocove-root", "Oother")):
        assert parse(*bad) == (1, "", "cove-init: malformed root item\n"), bad
    for bad in ("M", "M24", "M24:", "M:80", "M65536:1", "M000001:1", "M24:80x", "M-1:80", "M 24:80", "M24:80:1"):
        assert parse(bad) == (1, "", "cove-init: malformed terminal item\n"), bad
    assert parse("M24:80", "M24:80")[2] == "cove-init: malformed terminal item\n"


def test_the_guest_umask_item_is_strict(tmp_path):
    """The init's B item (the caller's umask): one, 1 to 4 octal digits, at most 0777; without it, 022."""
    require("gcc")
    source = ROOT_ITEM_TEST.replace("INIT", str(vmimage.INIT_SOURCE)).replace(
        'printf("%s %d %u %u\\n", r.root ? r.root : "(initramfs)", r.tty, r.rows, r.cols);',
        'printf("%d %03o\\n", r.umask_set, (unsigned)r.umask);',
    )
    assert "r.umask_set" in source
    (tmp_path / "t.c").write_text(source)
    subprocess.run(["gcc", "-O2", "-o", str(tmp_path / "t"), str(tmp_path / "t.c")], check=True)

    def parse(*items: str) -> tuple[int, str, str]:
        done = subprocess.run([str(tmp_path / "t"), "A/bin/x", *items], capture_output=True, text=True)
        return done.returncode, done.stdout, done.stderr

    assert parse() == (0, "0 000\n", "")
    assert parse("B27") == (0, "1 027\n", "")
    assert parse("B0777") == (0, "1 777\n", "")
    for bad in (("B",), ("B8",), ("B1000",), ("B00000",), ("B27x",), ("B-1",), ("B 27",), ("B27", "B22")):
        assert parse(*bad) == (1, "", "cove-init: malformed umask item\n"), bad
