"""Helpers shared by the secure file system tests (library, CLI and enclave mounts)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from cove.fs.layout import NODE_SIZE


def free_port_pair() -> int:
    """A port P with P+1 also free (swtpm's server and control ports)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port > 65000:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


@contextlib.contextmanager
def running_swtpm(state: Path, swtpm: str):
    """A software TPM on a free TCP port; yields its TCTI string; stopped afterwards."""
    state.mkdir(parents=True, exist_ok=True)
    port = free_port_pair()
    proc = subprocess.Popen(
        [
            swtpm,
            "socket",
            "--tpm2",
            "--server",
            f"type=tcp,port={port}",
            "--ctrl",
            f"type=tcp,port={port + 1}",
            "--tpmstate",
            f"dir={state}",
            "--flags",
            "not-need-init,startup-clear",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"swtpm exited: {proc.stderr.read().decode()}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("swtpm did not start") from None
                time.sleep(0.05)
        yield f"swtpm:port={port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def flip(path: str | Path, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def host_files(volume_dir: Path) -> dict[str, Path]:
    """Host file id -> path of every protected file of a volume."""
    return {p.name: p for p in (volume_dir / "files").glob("*/*") if not p.name.endswith(".recovery")}


def snapshot(volume_dir: Path, dest: Path) -> Path:
    shutil.copytree(volume_dir, dest, symlinks=True)
    return dest


def restore(snap: Path, volume_dir: Path) -> None:
    shutil.rmtree(volume_dir)
    shutil.copytree(snap, volume_dir, symlinks=True)


# Files of the tamper volume: logical path -> size. Each tamper case hits its own file.
BIG = 3072 + 130 * NODE_SIZE + 1000  # metadata node, root MHT, MHT node 1, 131 data nodes
DATA_SAMPLES = [(2, 0), (2, 4095), (40, 1234), (97, 17), (99, 2048), (131, 5), (132, 4000)]
MHT_SAMPLES = [(1, 0), (1, 2000), (1, 4095), (98, 31), (98, 3100)]
CASES = (
    "truncated",
    "extended",
    "extended-node",
    "nodes-swapped",
    "swap-a",
    "swap-b",
    "moved",
    "rolled-back",
    "deleted",
)


def build_tamper_volume(path: Path, key: bytes, label: str, anchor: str = "file") -> dict[str, str]:
    """A volume with one file per tamper case; returns logical path -> expected outcome.

    Outcomes: "ok" (reads back its content, "content of PATH"), "bad" (every
    read fails), "absent" (not in the volume). The host side is tampered
    with here: every byte of a metadata node (one file per byte), a sample of
    data and MHT node bytes, truncation, extension (partial and whole node),
    two nodes swapped, two files swapped, a file moved over another, a file
    rolled back, a file deleted, a file added.
    """
    from cove.fs.index import KeyPolicy
    from cove.fs.volume import Volume

    expected: dict[str, str] = {}
    ids: dict[str, str] = {}
    with Volume.create(path, key, label=label, policy=KeyPolicy.of("file:/k"), anchor=anchor, durable=False) as volume:

        def put(name: str, size: int, outcome: str) -> None:
            node = volume.write_file(name, content(name, size))
            ids[name] = node.id
            expected[name] = outcome

        for offset in range(NODE_SIZE):
            put(f"/meta/{offset:04d}", 100, "bad")
        for phys, offset in DATA_SAMPLES:
            put(f"/data/{phys}-{offset}", BIG, "bad")
        for phys, offset in MHT_SAMPLES:
            put(f"/mht/{phys}-{offset}", BIG, "bad")
        for name in CASES:
            put(f"/cases/{name}", BIG, "bad")
        put("/cases/moved-over", BIG, "bad")
        put("/cases/intact", BIG, "ok")
        put("/cases/small-intact", 10, "ok")
        volume.commit()
        old = (path / "files").joinpath(*_split(ids["/cases/rolled-back"])).read_bytes()
        node = volume.resolve("/cases/rolled-back")
        volume.acquire(node)
        volume.write(node, 5000, b"newer content")
        volume.release(node)
        volume.commit()
    files = host_files(path)
    for offset in range(NODE_SIZE):
        flip(files[ids[f"/meta/{offset:04d}"]], offset)
    for phys, offset in DATA_SAMPLES:
        flip(files[ids[f"/data/{phys}-{offset}"]], phys * NODE_SIZE + offset)
    for phys, offset in MHT_SAMPLES:
        flip(files[ids[f"/mht/{phys}-{offset}"]], phys * NODE_SIZE + offset)
    case = {name: files[ids[f"/cases/{name}"]] for name in CASES + ("moved-over", "intact")}
    os.truncate(case["truncated"], os.path.getsize(case["truncated"]) - NODE_SIZE)
    with open(case["extended"], "ab") as f:
        f.write(b"\0" * 100)
    with open(case["extended-node"], "ab") as f:
        f.write(b"\0" * NODE_SIZE)
    with open(case["nodes-swapped"], "r+b") as f:
        f.seek(2 * NODE_SIZE)
        a, b = f.read(NODE_SIZE), f.read(NODE_SIZE)
        f.seek(2 * NODE_SIZE)
        f.write(b + a)
    tmp = case["swap-a"].with_name("swap.tmp")
    os.rename(case["swap-a"], tmp)
    os.rename(case["swap-b"], case["swap-a"])
    os.rename(tmp, case["swap-b"])
    os.replace(case["moved"], case["moved-over"])
    case["rolled-back"].write_bytes(old)
    os.unlink(case["deleted"])
    # added from outside: a copy of a real file under a made-up id
    added = case["intact"].parent / "1-0011223344556677-8899aabbccddeeff"
    shutil.copyfile(case["intact"], added)
    return expected


def _split(file_id: str) -> tuple[str, str]:
    return file_id.split("-")[1][:2], file_id


def content(name: str, size: int) -> bytes:
    """Deterministic content of a test file."""
    seed = f"content of {name} ".encode()
    return (seed * (size // len(seed) + 1))[:size]
