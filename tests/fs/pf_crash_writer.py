"""Writer for the crash suite: random writes and commits until it is killed.

Usage: pf_crash_writer.py HOST_FILE KEY_HEX LOG SEED DURABLE CACHE_BYTES

Before each commit it appends ``begin <sha256>`` (the state being committed)
to LOG, after it ``commit <sha256>``; the checker accepts exactly the last
committed state or, if a ``begin`` follows it, that new state.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys

from cove.fs import ProtectedFile


def main() -> None:
    host, key_hex, log_path, seed, durable, cache = sys.argv[1:7]
    rng = random.Random(int(seed))
    key = bytes.fromhex(key_hex)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    f = ProtectedFile.open(host, key, "crash/file", "r+", cache_bytes=int(cache), durable=durable == "1")
    model = bytearray(f.read(0, f.size()))
    os.write(log, b"ready\n")
    while True:
        for _ in range(rng.randrange(1, 12)):
            op = rng.random()
            if op < 0.75:
                off = rng.randrange(0, 500_000)
                data = rng.randbytes(rng.choice([1, 100, 4096, 20_000, 90_000, 300_000, 700_000]))
                f.write(off, data)
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off : off + len(data)] = data
            else:
                size = rng.randrange(0, 520_000)
                f.truncate(size)
                if size < len(model):
                    del model[size:]
                else:
                    model.extend(bytes(size - len(model)))
        digest = hashlib.sha256(model).hexdigest()
        os.write(log, f"begin {digest}\n".encode())
        if rng.random() < 0.2:
            f.close()
            f = ProtectedFile.open(host, key, "crash/file", "r+", cache_bytes=int(cache), durable=durable == "1")
        else:
            f.flush()
        os.write(log, f"commit {digest}\n".encode())


if __name__ == "__main__":
    main()
