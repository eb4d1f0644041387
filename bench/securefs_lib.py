"""Throughput of the protected-file library against plain files and raw AES-GCM.

Prints MB/s (and ops/s for random reads) for sequential write, sequential
read and random 4 KiB reads, through ProtectedFile and through plain files in
the same directory, next to the AES-GCM rate of ``cryptography`` on 4 KiB
buffers measured in the same run; each figure is the median of ``--runs``.

Both sides run through the page cache (no fsync, ``durable=False``): the
figures measure the library's CPU cost, not the disk.

    python bench/securefs_lib.py [--size-mib 256] [--runs 3] [--dir .]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cove.fs import ProtectedFile
from cove.fs.layout import MD_USER_DATA_SIZE, NODE_SIZE

CHUNK = 1 << 20
KEY = os.urandom(16)
MB = 1e6


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def raw_aead(total: int) -> tuple[float, float, float]:
    """MB/s of AES-GCM on 4 KiB buffers, best case: one key, output into a reused buffer.

    Also the rate with a new key per buffer, which the format requires (every
    node has its own random key), as the practical ceiling for the library.
    """
    buf = os.urandom(NODE_SIZE)
    n = total // NODE_SIZE
    aead = AESGCM(os.urandom(16))
    iv = bytes(12)
    out = bytearray(NODE_SIZE + 16)
    plain = bytearray(NODE_SIZE)
    sealed = aead.encrypt(iv, buf, None)

    def enc():
        for _ in range(n):
            aead.encrypt_into(iv, buf, None, out)

    def dec():
        for _ in range(n):
            aead.decrypt_into(iv, sealed, None, plain)

    keys = [os.urandom(16) for _ in range(min(n, 65536))]

    def rekey():
        for i in range(n):
            AESGCM(keys[i % len(keys)]).encrypt_into(iv, buf, None, out)

    return total / timed(enc) / MB, total / timed(dec) / MB, total / timed(rekey) / MB


def seq_write_plain(path: str, data: memoryview, size: int) -> None:
    with open(path, "wb", buffering=0) as f:
        for off in range(0, size, CHUNK):
            f.write(data[off % len(data) : off % len(data) + CHUNK])


def seq_read_plain(path: str, size: int) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(CHUNK):
            pass


def seq_write_pf(path: str, data: memoryview, size: int) -> None:
    with ProtectedFile.open(path, KEY, "bench", "w", durable=False) as f:
        for off in range(0, size, CHUNK):
            f.write(off, data[off % len(data) : off % len(data) + CHUNK])


def seq_read_pf(path: str, size: int) -> None:
    with ProtectedFile.open(path, KEY, "bench", "r") as f:
        for off in range(0, size, CHUNK):
            f.read(off, CHUNK)


def rand_read_plain(path: str, offsets: list[int]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in offsets:
            os.pread(fd, NODE_SIZE, off)
    finally:
        os.close(fd)


def rand_read_pf(path: str, offsets: list[int]) -> None:
    with ProtectedFile.open(path, KEY, "bench", "r") as f:
        for off in offsets:
            f.read(MD_USER_DATA_SIZE + off, NODE_SIZE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--random-reads", type=int, default=20000)
    ap.add_argument("--dir", default=".")
    args = ap.parse_args()
    size = args.size_mib << 20
    data = memoryview(os.urandom(64 << 20) * 2)  # 128 MiB pattern, reused cyclically
    rng = random.Random(1)
    offsets = [
        rng.randrange(0, (size - MD_USER_DATA_SIZE) // NODE_SIZE - 1) * NODE_SIZE for _ in range(args.random_reads)
    ]
    work = tempfile.mkdtemp(prefix="securefs-bench-", dir=args.dir)
    plain, pf = os.path.join(work, "plain"), os.path.join(work, "pf")
    res: dict[str, list[float]] = {
        k: [] for k in ("aead_enc", "aead_dec", "aead_rekey", "w_plain", "w_pf", "r_plain", "r_pf", "rr_plain", "rr_pf")
    }
    try:
        for _ in range(args.runs):
            enc, dec, rekey = raw_aead(64 << 20)
            res["aead_enc"].append(enc)
            res["aead_dec"].append(dec)
            res["aead_rekey"].append(rekey)
            res["w_plain"].append(size / timed(lambda: seq_write_plain(plain, data, size)) / MB)
            res["w_pf"].append(size / timed(lambda: seq_write_pf(pf, data, size)) / MB)
            res["r_plain"].append(size / timed(lambda: seq_read_plain(plain, size)) / MB)
            res["r_pf"].append(size / timed(lambda: seq_read_pf(pf, size)) / MB)
            res["rr_plain"].append(len(offsets) / timed(lambda: rand_read_plain(plain, offsets)))
            res["rr_pf"].append(len(offsets) / timed(lambda: rand_read_pf(pf, offsets)))
    finally:
        shutil.rmtree(work)
    m = {k: statistics.median(v) for k, v in res.items()}
    print(f"protected-file library, {args.size_mib} MiB, median of {args.runs} runs, page cache")
    print(
        f"raw AES-GCM 4 KiB, one key, no allocation: encrypt {m['aead_enc']:8.0f} MB/s   "
        f"decrypt {m['aead_dec']:8.0f} MB/s"
    )
    print(f"raw AES-GCM 4 KiB encrypt, a new key per buffer (as the format requires): {m['aead_rekey']:8.0f} MB/s")
    rows = [
        ("sequential write", "w_plain", "w_pf", "aead_enc", "MB/s"),
        ("sequential read", "r_plain", "r_pf", "aead_dec", "MB/s"),
        ("random 4 KiB read", "rr_plain", "rr_pf", None, "ops/s"),
    ]
    print(f"{'':20}{'plain':>12}{'protected':>12}{'vs plain':>10}{'vs raw AEAD':>13}{'vs keyed AEAD':>15}")
    for name, p, q, raw, unit in rows:
        vs_raw = f"{m[q] / m[raw]:12.0%}" if raw else f"{m[q] * NODE_SIZE / MB / m['aead_dec']:12.0%}"
        mbs = m[q] if raw else m[q] * NODE_SIZE / MB
        print(f"{name:20}{m[p]:12.0f}{m[q]:12.0f}{m[q] / m[p]:10.1%} {vs_raw}{mbs / m['aead_rekey']:15.0%}  ({unit})")


if __name__ == "__main__":
    main()
