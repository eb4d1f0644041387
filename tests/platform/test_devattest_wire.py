"""The standard-library FUSE loop behind /dev/attestation (cove.platform.devattest.serve), on a real mount.

The loop runs in a thread of the test process over a real kernel mount, with
the tree wrapped to count what the kernel asks: a quote costs no FLUSH, a
written handle still gets its error at close, what would change the tree is
refused, and nothing a caller does ends the loop but an unmount.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone

import pytest

from cove.attest.cove_evidence_verify import verify_cove_evidence
from cove.platform import devattest
from cove.platform.devattest_server import build
from cove.platform.reports import EnclaveClaims
from tests.conftest import require

CLAIMS = EnclaveClaims(b"\x0a" * 32, b"\x0b" * 32, 9, 4, False, "sim", "namespaces+seccomp", "inst-wire")


class Counted:
    """The enclave's tree, counting each kind of request the kernel sends."""

    def __init__(self, tree: devattest.AttestationFs):
        self.tree = tree
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str):
        method = getattr(self.tree, name)

        def counted(*args):
            self.calls[name] += 1
            return method(*args)

        return counted


@pytest.fixture
def mounted(tmp_path, platform_paths):
    """(mount folder, counting tree); the loop's thread must end when the folder is unmounted."""
    require("fusermount3")
    tree, why_none = build(CLAIMS)
    assert why_none is None
    counted = Counted(tree)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    fd = devattest.mount(str(mountpoint), allow_other=False)
    failure: list[BaseException] = []

    def loop() -> None:
        try:
            devattest.serve(fd, counted)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failure.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield mountpoint, counted
    finally:
        devattest.unmount(str(mountpoint))
        thread.join(10)
        os.close(fd)
    assert not thread.is_alive(), "the loop did not end at the unmount"
    assert not failure, failure


def _settled(counted: Counted, name: str, want: int) -> int:
    """RELEASE is sent after close returns: wait briefly for it."""
    deadline = time.monotonic() + 5
    while counted.calls[name] < want and time.monotonic() < deadline:
        time.sleep(0.01)
    return counted.calls[name]


def test_a_quote_is_open_two_reads_and_release_without_flush(mounted):
    mnt, counted = mounted
    (mnt / "quote").read_bytes()  # names and attributes are now cached
    _settled(counted, "release", 1)
    counted.calls.clear()
    for _ in range(5):
        fd = os.open(mnt / "quote", os.O_RDONLY)
        quote = b""
        while chunk := os.read(fd, 65536):
            quote += chunk
        os.close(fd)
        assert verify_cove_evidence(quote, datetime.now(timezone.utc)).report.instance_id == "inst-wire"
    assert _settled(counted, "release", 5) == 5
    assert dict(counted.calls) == {"open": 5, "read": 10, "release": 5}  # no flush, no lookup, no getattr


def test_a_written_handle_is_still_flushed_so_a_short_write_fails_at_close(mounted):
    mnt, counted = mounted
    data = os.urandom(64)
    (mnt / "user_report_data").write_bytes(data)
    assert counted.calls["flush"] == 1
    fd = os.open(mnt / "user_report_data", os.O_WRONLY)
    os.write(fd, b"short")
    with pytest.raises(OSError) as err:
        os.close(fd)
    assert err.value.errno == errno.EINVAL
    claims = verify_cove_evidence((mnt / "quote").read_bytes(), datetime.now(timezone.utc))
    assert claims.report.report_data == data  # a new quote for the new data, never a cached one


@pytest.mark.parametrize(
    "change",
    [
        lambda m: os.mkdir(m / "d"),
        lambda m: os.rmdir(m / "keys"),
        lambda m: os.unlink(m / "quote"),
        lambda m: os.rename(m / "quote", m / "q2"),
        lambda m: os.symlink("quote", m / "s"),
        lambda m: os.link(m / "quote", m / "h"),
        lambda m: os.mknod(m / "n"),
        lambda m: open(m / "new", "wb"),
        lambda m: os.truncate(m / "quote", 3),
        lambda m: os.chmod(m / "user_report_data", 0o777),
        lambda m: os.setxattr(m / "quote", "user.x", b"1"),
    ],
    ids=["mkdir", "rmdir", "unlink", "rename", "symlink", "link", "mknod", "create", "truncate", "chmod", "setxattr"],
)
def test_what_would_change_the_tree_is_refused_and_the_loop_goes_on(mounted, change):
    mnt, _ = mounted
    with pytest.raises(OSError):
        change(mnt)
    assert sorted(os.listdir(mnt)) == ["attestation_type", "keys", "quote", "report", "user_report_data"]
    assert (mnt / "attestation_type").read_bytes() == b"cove"


def test_many_readers_at_once_each_get_a_whole_fresh_quote(mounted):
    mnt, _ = mounted
    quotes: list[bytes] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for _ in range(20):
                quotes.append((mnt / "quote").read_bytes())
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(quotes) == 160
    now = datetime.now(timezone.utc)
    assert all(verify_cove_evidence(q, now).report.measurement == b"\x0a" * 32 for q in quotes)
    assert len(set(quotes)) == 160  # each open signs anew


def test_a_reader_killed_mid_request_does_not_end_the_loop(mounted):
    mnt, _ = mounted
    for _ in range(10):
        reader = subprocess.Popen(
            [sys.executable, "-c", "import sys\nwhile True: open(sys.argv[1], 'rb').read()", str(mnt / "quote")]
        )
        time.sleep(0.05)
        reader.kill()
        reader.wait()
    assert (mnt / "attestation_type").read_bytes() == b"cove"


def test_a_fault_in_one_answer_is_eio_and_the_loop_goes_on(mounted, capfd):
    mnt, counted = mounted

    def broken(*_args):
        raise RuntimeError("a bug")

    (mnt / "quote").read_bytes()
    counted.tree.read = broken
    with pytest.raises(OSError) as err:
        (mnt / "quote").read_bytes()
    assert err.value.errno == errno.EIO
    assert "request 15 failed: RuntimeError: a bug" in capfd.readouterr().err
    del counted.tree.read  # the class's own again
    assert verify_cove_evidence((mnt / "quote").read_bytes(), datetime.now(timezone.utc))


def test_the_per_run_server_imports_neither_pyfuse3_nor_trio(tmp_path, platform_paths):
    """Its start is on `cove run`'s path: pyfuse3 and trio cost about 110 ms of imports there."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "cove.platform.devattest_server"],
        input=b"",
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2  # nothing on stdin: the runtime did not need it after all
    imported = {line.split("|")[-1].strip() for line in done.stderr.decode().splitlines() if "|" in line}
    assert "cove.platform.devattest" in imported
    assert not {"pyfuse3", "trio"} & imported, sorted(imported & {"pyfuse3", "trio"})


def test_mounting_where_no_folder_is_fails_with_the_reason(tmp_path):
    with pytest.raises(OSError) as err:
        devattest.mount(str(tmp_path / "absent"), allow_other=False)
    assert err.value.errno in (errno.ENOENT, errno.EIO) and err.value.strerror  # one line to report, no traceback


def test_the_tree_answers_without_a_mount():
    tree = devattest.AttestationFs("none", None, None)
    assert [name for _, _, name in tree.readdir(devattest.ROOT, 0)] == [b"attestation_type"]
    with pytest.raises(devattest.FuseError) as err:
        tree.lookup(devattest.ROOT, b"quote")
    assert err.value.errno == errno.ENOENT
    fh = tree.open(2, os.O_RDONLY)
    assert tree.read(fh, 0, 100) == b"none" and tree.read(fh, 4, 100) == b""
    with pytest.raises(devattest.FuseError):
        tree.read(fh + 1, 0, 1)  # a handle never given out
