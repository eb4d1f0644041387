"""Enclave logs rotated by size: no line lost, `cove logs -f` follows across rotations, the count is kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cove.daemon import logfile
from tests.conftest import require
from tests.daemon.conftest import Node, shut_down
from tests.e2e.helpers import make_instance

SIZE = 4096
LINES = 1500  # about 60 kB: some fifteen rotations of a 4 KiB log


@pytest.fixture(scope="module")
def small_node(cove, test_group, tmp_path_factory):
    require("bwrap")
    node = Node(Path(str(tmp_path_factory.mktemp("lognode"))), cove)
    node.extra_args = ["--log-max-size", str(SIZE), "--log-max-files", "3"]
    node.start()
    yield node
    shut_down(node)


def test_rotation_loses_no_line_and_follow_crosses_it(small_node, tmp_path):
    node = small_node
    c = node.cove
    instance = make_instance(c, tmp_path)
    script = (
        'sleep 1; i=0; while [ $i -lt %d ]; do echo "line $i of the rotation test, padded to some length"; '
        "i=$((i + 1)); [ $((i %% 50)) -eq 0 ] && sleep 0.05; done; echo end" % LINES
    )
    ident = c.ok("run", "-d", "/bin/sh", "-c", script, cwd=instance).stdout.strip()
    follower = subprocess.Popen(
        c.popen_args("logs", "-f", ident), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=c.env
    )
    out, err = follower.communicate(timeout=120)
    assert follower.returncode == 0, err
    expected = [f"line {i} of the rotation test, padded to some length" for i in range(LINES)] + ["end"]
    assert out.decode().splitlines() == expected  # every line once, in order, across every rotation
    node.until(ident, "exited")
    folder = node.root / "enclaves" / ident
    files = sorted(p.name for p in folder.glob("log*"))
    assert files == ["log", "log.1", "log.2"]  # the live file and two rotated ones
    for name in files:
        data = (folder / name).read_bytes()
        assert len(data) <= SIZE and data.endswith(b"\n")  # whole lines in each file
    kept = c.ok("logs", ident).stdout.splitlines()
    assert kept == expected[-len(kept) :] and len(kept) > 100  # what is kept: the newest lines, contiguous
    assert c.ok("logs", "--tail", "3", ident).stdout.splitlines() == expected[-3:]
    c.ok("rm", ident)


def test_a_line_longer_than_the_file_and_sizes(tmp_path):
    read, write = os.pipe()
    writer = logfile.Writer(read, tmp_path / "log", SIZE, 2).start()
    os.write(write, b"a" * (SIZE + 100) + b"\nshort\n")
    os.close(write)
    writer.finish()
    assert (tmp_path / "log.1").read_bytes() + (tmp_path / "log").read_bytes() == b"a" * (SIZE + 100) + b"\nshort\n"
    assert logfile.parse_size("10MiB") == 10 << 20 and logfile.parse_size("512k") == 512 << 10
    for bad in ("10x", "-1", "1e9", "", "9" * 20):
        with pytest.raises(ValueError):
            logfile.parse_size(bad)


@pytest.mark.parametrize(
    "option", [["--log-max-size", "10x"], ["--log-max-size", "100"], ["--log-max-size", "-5"], ["--log-max-files", "0"]]
)
def test_bad_rotation_options_are_one_line(cove, tmp_path, option):
    from tests.conftest import COVE, error_line

    done = subprocess.run(
        [COVE, "daemon", "--root", str(tmp_path / "r"), "--socket", str(tmp_path / "s"), *option],
        capture_output=True,
        text=True,
        env=cove.env,
        timeout=60,
    )
    assert done.returncode == 2 and error_line(done).startswith("cove: error:")
    assert not (tmp_path / "s").exists()


# VmHWM, not ru_maxrss: after a vfork and exec, ru_maxrss also holds the parent's peak (the test run's)
TAIL_PROBE = """
import sys
from pathlib import Path
from cove.daemon import logfile
out = logfile.tail(Path(sys.argv[1]), 3, 2)
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(out.decode(), int(peak.split()[1]) // 1024)
"""


def test_tail_reads_only_the_end(tmp_path):
    """A 4 GiB log (sparse here; rotation off lets it grow so): --tail reads backwards, not the whole file."""
    log = tmp_path / "log"
    with open(log, "wb") as handle:
        handle.truncate(4 << 30)
        handle.seek(0, os.SEEK_END)
        handle.write(b"one\ntwo\nthree\n")
    (tmp_path / "log.1").write_bytes(b"older\n")
    done = subprocess.run([sys.executable, "-c", TAIL_PROBE, str(log)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    text, rss = done.stdout.rsplit(" ", 1)
    assert text == "two\nthree\n" and int(rss) < 200, done.stdout[-200:]  # MiB: the file itself never is
    assert logfile.tail(tmp_path / "log.1", 3, 5) == b"older\n"


def test_rotation_keeps_the_live_file_and_logs_fall_back(small_node, tmp_path):
    """The writer never leaves `log` missing; and a log missing anyway (an older supervisor's rotation) is
    read from log.1, not answered with a 500."""
    log = tmp_path / "log"
    read, write = os.pipe()
    writer = logfile.Writer(read, log, logfile.MIN_BYTES, 3).start()
    for n in range(200):
        os.write(write, b"line %04d\n" % n + b"x" * 300 + b"\n")
        assert log.exists()
    os.close(write)
    writer.finish()
    assert not (tmp_path / "log.new").exists() and (tmp_path / "log.1").exists() and (tmp_path / "log.2").exists()
    instance = make_instance(small_node.cove, tmp_path)
    ident = small_node.cove.ok("run", "-d", "/bin/echo", "the-line", cwd=instance).stdout.strip()
    small_node.until(ident, "exited")
    folder = small_node.root / "enclaves" / ident
    os.rename(folder / "log", folder / "log.1")
    status, body = small_node.api("GET", f"/v1/enclaves/{ident}/logs")
    assert status == 200 and body == b"the-line\n", body
    small_node.cove.ok("rm", ident)
