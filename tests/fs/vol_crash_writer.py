"""Writer for the volume crash suite: random namespace and content changes, commits, until killed.

Usage: vol_crash_writer.py VOLUME KEY_HEX LOG SEED CACHE_BYTES DURABLE

Before each commit it appends ``begin <digest>`` (the state being committed)
to LOG, after it ``commit <digest>``; see :func:`state_digest`.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys

from cove.fs.volume import Volume

NAMES = [f"f{i}" for i in range(6)]
DIRS = ["", "d1/", "d1/d2/", "d3/"]


def state_digest(volume: Volume) -> str:
    """A digest of the namespace and every file's content."""
    h = hashlib.sha256()
    for path, node in volume.walk():
        h.update(f"{path}\0{node.kind}\0".encode())
        if node.kind == "f":
            h.update(hashlib.sha256(volume.read_file(path)).digest())
    return h.hexdigest()


def step(volume: Volume, rng: random.Random) -> None:
    path = rng.choice(DIRS) + rng.choice(NAMES)
    op = rng.random()
    try:
        node = volume.resolve(path)
    except FileNotFoundError:
        node = None
    if node is not None and node.kind != "f":
        return
    if op < 0.45 or node is None:
        data = rng.randbytes(rng.choice([0, 1, 3000, 4096, 20_000, 150_000, 600_000]))
        if node is None or rng.random() < 0.3:
            volume.write_file(path, data)
        else:
            handle = volume.acquire(node)
            try:
                off = rng.randrange(0, handle.size() + 1)
                volume.write(node, off, data)
            finally:
                volume.release(node)
    elif op < 0.6:
        volume.truncate(node, rng.randrange(0, 200_000))
    elif op < 0.75:
        parent = volume.resolve(os.path.dirname(path) or "/")
        volume.unlink(parent, path.rsplit("/", 1)[-1].encode())
    else:
        dest = rng.choice(DIRS) + rng.choice(NAMES)
        try:
            target = volume.resolve(dest)
        except FileNotFoundError:
            target = None
        if target is not None and target.kind != "f":
            return
        dest_parent = volume.makedirs(os.path.dirname(dest) or "/")
        volume.rename(
            volume.resolve(os.path.dirname(path) or "/"),
            path.rsplit("/", 1)[-1].encode(),
            dest_parent,
            dest.rsplit("/", 1)[-1].encode(),
        )


def main() -> None:
    path, key_hex, log_path, seed, cache, durable = sys.argv[1:7]
    rng = random.Random(int(seed))
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    volume = Volume.open(path, bytes.fromhex(key_hex), cache_bytes=int(cache), durable=durable == "1")
    os.write(log, b"ready\n")
    while True:
        for _ in range(rng.randrange(1, 10)):
            step(volume, rng)
        digest = state_digest(volume)
        os.write(log, f"begin {digest}\n".encode())
        volume.commit()
        os.write(log, f"commit {digest}\n".encode())


if __name__ == "__main__":
    main()
