"""cove.util.detach_after_exit: a FUSE server's mount goes when the server dies, however it dies.

A process mounts an empty /dev/attestation file system (the real mount(2) as
root, fusermount3 as an unprivileged user), leaves its watcher, and is killed
with SIGKILL while nothing is serving the mount: the mount must go by itself.
And a watcher must not detach a mount it was not left for: the same path,
remounted by someone else after its own mount went, stays, even when the
new mount has the old one's device number.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cove import util
from tests.conftest import require

MOUNTER = """
import sys, time
from cove import util
from cove.platform import devattest
fd = devattest.mount(sys.argv[1], allow_other=False)
watcher = util.detach_after_exit(sys.argv[1])
print(watcher.pid, flush=True)
command = sys.stdin.readline().strip()
if command == "unmount":  # the ordinary stop: unmounted, then the watcher released
    devattest.unmount(sys.argv[1])
    watcher.release()
    print("unmounted", flush=True)
elif command == "release":  # released while the mount is still there (an unmount that failed)
    watcher.release()
    print("released", flush=True)
time.sleep(3600)
"""


# as root both paths (umount2, and fusermount3 as the test account); as a user, that user's path is all there is
@pytest.fixture(params=["root", "unprivileged"] if os.geteuid() == 0 else ["unprivileged"])
def runner(request) -> tuple[list[str], str, Path]:
    """(command prefix, python, a folder the mounting user owns)."""
    require("fusermount3")
    if not os.path.exists("/dev/fuse"):
        pytest.fail("no /dev/fuse: run scripts/setup (fuse3)")
    base = Path(tempfile.mkdtemp(prefix="cove-watch-"))
    base.chmod(0o755)
    if request.param == "root":
        return [], sys.executable, base
    user = request.getfixturevalue("user_cove")
    os.chown(base, user.uid, user.gid)
    return user.prefix, str(Path(user.command).parent / "python"), base


def _gone(mountpoint: Path, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while util.mount_device(str(mountpoint)) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _start(runner, mountpoint: Path) -> tuple[subprocess.Popen[str], int]:
    prefix, python, _ = runner
    process = subprocess.Popen(
        [*prefix, python, "-c", MOUNTER, str(mountpoint)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    assert process.stdout is not None
    watcher = int(process.stdout.readline())
    assert util.mount_device(str(mountpoint)) is not None, "the mounter did not mount"
    return process, watcher


def _wait_gone(pid: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, f"the watcher {pid} did not end"
        time.sleep(0.05)


def test_a_killed_servers_mount_goes(runner, mountpoint):
    process, watcher = _start(runner, mountpoint)
    try:
        assert Path(f"/proc/{watcher}").exists(), "no watcher was left"
        deadline = time.monotonic() + 10  # the watcher's first step, after the fork returned to its server
        while os.getsid(watcher) != watcher:
            assert time.monotonic() < deadline, "the watcher shares a session with its server"
            time.sleep(0.01)
        _kill_and_see_the_mount_go(process, mountpoint)
    finally:
        _end(process, mountpoint)


def test_a_watcher_leaves_a_mount_that_is_not_its_own(runner, mountpoint):
    first, first_watcher = _start(runner, mountpoint)
    second = None
    try:
        assert first.stdin is not None and first.stdout is not None
        first.stdin.write("unmount\n")
        first.stdin.flush()
        assert first.stdout.readline().strip() == "unmounted"
        second, _ = _start(runner, mountpoint)  # another server's mount at the same path
        device = util.mount_device(str(mountpoint))
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        _wait_gone(first_watcher)
        assert util.mount_device(str(mountpoint)) == device, "the first server's watcher detached another's mount"
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        _no_mount_left(mountpoint)


def _bind(source: Path, target: Path) -> None:
    """mount(2) MS_BIND, without util-linux's look at the source (a dead FUSE root answers ENOTCONN)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(os.fsencode(source), os.fsencode(target), None, 4096, None) != 0:  # MS_BIND
        error = ctypes.get_errno()
        raise OSError(error, f"mount --bind {source} {target}: {os.strerror(error)}")


def _detach(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


if os.geteuid() == 0:  # binds need root; as a user the suite has no way to put a mount with that device there

    def test_a_dead_servers_watcher_leaves_a_later_mount_with_the_same_device(tmp_path):
        """The kernel gives the next FUSE mount at a path the device number of the last one (a probe saw it
        every time), so a watcher held up (a loaded machine; here SIGSTOP) can find, after its server died
        and someone detached the dead mount, a new mount with the old device number. Made deterministic with
        a bind of the old mount itself put back at the path: the same device, another mount. The watcher,
        let go, must leave it (the kernel's unique mount id tells them apart)."""
        require("fusermount3")
        path, held = tmp_path / "attestation", tmp_path / "held"
        path.mkdir()
        held.mkdir()
        process, watcher = _start(([], sys.executable, tmp_path), path)
        try:
            device = util.mount_device(str(path))
            _bind(path, held)  # the first mount, kept at another path
            os.kill(watcher, signal.SIGSTOP)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            _detach(path)
            assert util.mount_device(str(path)) is None, "the dead mount did not go"
            _bind(held, path)  # another mount at the path, with the same device number
            assert util.mount_device(str(path)) == device
            os.kill(watcher, signal.SIGCONT)
            _wait_gone(watcher)
            assert util.mount_device(str(path)) == device, "the dead server's watcher detached a later mount"
        finally:
            try:
                os.kill(watcher, signal.SIGCONT)
            except ProcessLookupError:
                pass
            if process.poll() is None:
                process.kill()
                process.wait()
            for folder in (path, held):
                while util.mount_device(str(folder)) is not None:
                    _detach(folder)


def _kill_and_see_the_mount_go(process: subprocess.Popen[str], mountpoint: Path) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert _gone(mountpoint), "the dead server's mount stayed"


def _end(process: subprocess.Popen[str], mountpoint: Path) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()
    _no_mount_left(mountpoint)


@pytest.fixture
def mountpoint(runner) -> Path:
    """An empty folder the mounting user owns, to mount on."""
    folder = runner[2] / "attestation"
    folder.mkdir()
    os.chown(folder, runner[2].stat().st_uid, runner[2].stat().st_gid)
    return folder


def _no_mount_left(mountpoint: Path) -> None:
    """Whatever is still mounted there goes (a failed test must not leave mounts behind)."""
    assert _gone(mountpoint), f"a mount stayed at {mountpoint}"


def test_a_release_while_still_mounted_keeps_the_watcher(runner, mountpoint):
    """An unmount that failed, then the release: the mount is still there, so the watcher stays for it."""
    process, watcher = _start(runner, mountpoint)
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write("release\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "released"
        assert Path(f"/proc/{watcher}").exists(), "the watcher left with the mount still there"
        _kill_and_see_the_mount_go(process, mountpoint)
    finally:
        _end(process, mountpoint)
