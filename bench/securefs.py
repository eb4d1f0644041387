"""Secure file system throughput, all in one run: raw AEAD, plain files, the library, an enclave mount.

Sequential write and read of a file (default 256 MiB) and random 4 KiB reads
through (a) the protected-file library, (b) an encrypted mount inside a sim
enclave (Debian's python3.11 doing the I/O, timed inside), against (c) plain
files in the same folder and (d) AES-GCM of ``cryptography`` on 4 KiB
buffers (the cipher of the format). Each figure is the median of ``--runs``.
Then the FUSE server's peak RSS while a file of ``--rss-gib`` GiB is written
and read back through the mount.

Everything goes through the page cache (the library with durable=False; the
mount's writes are timed up to close, before the commit's fsync), so the
figures measure CPU cost, not the disk. A mount's reads run in a new enclave
(a new mount), so they are served by the FUSE server, not the kernel's cache
of that mount.

    python bench/securefs.py [--size-mib 256] [--runs 3] [--random-reads 20000] [--rss-gib 1] [--dir .]

Needs bwrap, fusermount3 and python3.11 (scripts/setup). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from securefs_lib import (  # noqa: E402
    MB,
    rand_read_pf,
    rand_read_plain,
    raw_aead,
    seq_read_pf,
    seq_read_plain,
    seq_write_pf,
    seq_write_plain,
    timed,
)

from cove.fs.layout import MD_USER_DATA_SIZE, NODE_SIZE  # noqa: E402

COVE = str(Path(sys.executable).parent / "cove")
PYTHON = "/usr/bin/python3.11"

INSIDE = r"""
import json, os, random, sys, time
cmd, path = sys.argv[1], sys.argv[2]
CHUNK = 1 << 20
if cmd == "write":
    size = int(sys.argv[3])
    block = os.urandom(CHUNK)
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for off in range(0, size, CHUNK):
        os.write(fd, block)
    os.close(fd)
    print(json.dumps({"seconds": time.perf_counter() - t}))
elif cmd == "read":
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    total = 0
    while True:
        data = os.read(fd, CHUNK)
        if not data:
            break
        total += len(data)
    os.close(fd)
    print(json.dumps({"seconds": time.perf_counter() - t, "bytes": total}))
elif cmd == "random":
    count, seed = int(sys.argv[3]), int(sys.argv[4])
    size = os.stat(path).st_size
    rng = random.Random(seed)
    offsets = [rng.randrange(0, size // 4096 - 1) * 4096 for _ in range(count)]
    fd = os.open(path, os.O_RDONLY)
    t = time.perf_counter()
    for off in offsets:
        os.pread(fd, 4096, off)
    seconds = time.perf_counter() - t
    os.close(fd)
    print(json.dumps({"seconds": seconds}))
"""


class EnclaveBench:
    """A sim enclave with python3.11 and an encrypted mount at /data, in a private folder."""

    def __init__(self, work: Path):
        self.work = work
        home = work / "home"
        home.mkdir()
        platform = work / "platform"
        platform.mkdir(mode=0o700)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("COVE_")}
        self.env.update(HOME=str(home), XDG_CONFIG_HOME=str(home), COVE_PLATFORM_DIR=str(platform), COVE_FS_STATS="1")
        key = work / "volume.key"
        key.write_bytes(os.urandom(16))
        (work / "inside.py").write_text(INSIDE)
        self.root = work / "bench"
        self._cove("new", "bench", cwd=work)
        self._cove("add", "/bin/sh", PYTHON, "/usr/lib/python3.11")
        self._cove("add", "--to", "/app", str(work / "inside.py"))
        with open(self.root / "cove.toml", "a") as f:
            f.write(
                f'\n[[mounts]]\ntarget = "/data"\ntype = "encrypted"\nkey = "file:{key}"\n'
                f'options = {{ rollback = "file" }}\n'
            )
        self._cove("build")

    def _cove(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([COVE, *args], cwd=cwd or self.root, env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"cove {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def inside(self, *args: str) -> tuple[dict, int]:
        """Run the workload in the enclave: (its JSON report, the FUSE server's peak RSS in KiB)."""
        proc = self._cove("run", PYTHON, "/app/inside.py", *args)
        rss = max(
            (int(line.rsplit("=", 1)[1]) for line in proc.stderr.splitlines() if line.startswith("cove-fs-stats")),
            default=0,
        )
        return json.loads(proc.stdout.strip().splitlines()[-1]), rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--random-reads", type=int, default=20000)
    ap.add_argument("--rss-gib", type=float, default=1.0)
    ap.add_argument("--dir", default=".")
    args = ap.parse_args()
    for tool in ("bwrap", "fusermount3", "python3.11"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: run scripts/setup")
    size = args.size_mib << 20
    data = memoryview(os.urandom(64 << 20) * 2)
    rng = random.Random(1)
    offsets = [
        rng.randrange(0, (size - MD_USER_DATA_SIZE) // NODE_SIZE - 1) * NODE_SIZE for _ in range(args.random_reads)
    ]
    work = Path(tempfile.mkdtemp(prefix="securefs-bench-", dir=args.dir))
    plain, pf = str(work / "plain"), str(work / "pf")
    res: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        res.setdefault(key, []).append(value)

    try:
        print(f"setting up an enclave in {work} ...", file=sys.stderr)
        enclave = EnclaveBench(work)
        for run in range(args.runs):
            enc, dec, rekey = raw_aead(64 << 20)
            add("aead_enc", enc)
            add("aead_dec", dec)
            add("aead_rekey", rekey)
            add("w_plain", size / timed(lambda: seq_write_plain(plain, data, size)) / MB)
            add("r_plain", size / timed(lambda: seq_read_plain(plain, size)) / MB)
            add("rr_plain", len(offsets) / timed(lambda: rand_read_plain(plain, offsets)))
            add("w_pf", size / timed(lambda: seq_write_pf(pf, data, size)) / MB)
            add("r_pf", size / timed(lambda: seq_read_pf(pf, size)) / MB)
            add("rr_pf", len(offsets) / timed(lambda: rand_read_pf(pf, offsets)))
            report, _ = enclave.inside("write", "/data/bench.bin", str(size))
            add("w_mnt", size / report["seconds"] / MB)
            report, _ = enclave.inside("read", "/data/bench.bin")
            add("r_mnt", report["bytes"] / report["seconds"] / MB)
            report, _ = enclave.inside("random", "/data/bench.bin", str(args.random_reads), str(run))
            add("rr_mnt", args.random_reads / report["seconds"])
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
        os.unlink(plain)
        os.unlink(pf)
        big = int(args.rss_gib * (1 << 30))
        _, rss_write = enclave.inside("write", "/data/big.bin", str(big))
        _, rss_read = enclave.inside("read", "/data/big.bin")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    m = {k: statistics.median(v) for k, v in res.items()}
    print(f"secure file system, {args.size_mib} MiB file, median of {args.runs} runs, page cache, {args.dir}")
    print(
        f"raw AES-GCM on 4 KiB buffers (cryptography), one key: encrypt {m['aead_enc']:.0f} MB/s, "
        f"decrypt {m['aead_dec']:.0f} MB/s; a new key per buffer: {m['aead_rekey']:.0f} MB/s"
    )
    print(
        f"{'':22}{'plain':>10}{'library':>10}{'mount':>10}{'lib/raw':>9}{'mount/lib':>11}"
        f"{'lib/plain':>11}{'mount/plain':>13}"
    )
    rows = [
        ("sequential write MB/s", "w", "aead_enc"),
        ("sequential read MB/s", "r", "aead_dec"),
        ("random 4 KiB reads/s", "rr", None),
    ]
    for name, key, raw in rows:
        plain_v, lib, mnt = m[f"{key}_plain"], m[f"{key}_pf"], m[f"{key}_mnt"]
        vs_raw = f"{lib / m[raw]:9.0%}" if raw else f"{lib * NODE_SIZE / MB / m['aead_dec']:9.0%}"
        print(
            f"{name:22}{plain_v:10.0f}{lib:10.0f}{mnt:10.0f}{vs_raw}{mnt / lib:11.0%}"
            f"{lib / plain_v:11.1%}{mnt / plain_v:13.1%}"
        )
    print(
        "targets: library >= 25% of raw AEAD (sequential): write "
        f"{m['w_pf'] / m['aead_enc']:.0%}, read {m['r_pf'] / m['aead_dec']:.0%}; "
        f"mount >= 50% of library: write {m['w_mnt'] / m['w_pf']:.0%}, read {m['r_mnt'] / m['r_pf']:.0%}; "
        f"random 4 KiB reads through the mount >= 5000/s: {m['rr_mnt']:.0f}/s"
    )
    print(
        f"FUSE server peak RSS, {args.rss_gib:g} GiB written then read back: "
        f"{max(rss_write, rss_read) / 1024:.0f} MB (write {rss_write / 1024:.0f} MB, read {rss_read / 1024:.0f} MB; "
        "target <= 100 MB)"
    )


if __name__ == "__main__":
    main()
