"""The vm launch description (build/vm/launch.cbor) is read through cove.decode: hostile bytes are one IntegrityError."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cbor2
import pytest

from cove.errors import IntegrityError
from cove.image import vmimage

KERNEL, INITRD = b"kernel bytes", b"initrd bytes"


def _description(**changes: object) -> dict[str, object]:
    description: dict[str, object] = {
        "format": vmimage.FORMAT,
        "kernel": hashlib.sha256(KERNEL).digest(),
        "initrd": hashlib.sha256(INITRD).digest(),
        "cmdline": "console=ttyS0",
        "machine": vmimage.MACHINE,
        "vcpus": 1,
        "memory": 256 << 20,
        "devices": list(vmimage.DEVICES),
    }
    description.update(changes)
    return description


def _build(tmp_path: Path, launch: bytes) -> tuple[Path, Path]:
    folder = tmp_path / "build" / vmimage.FOLDER
    folder.mkdir(parents=True)
    (folder / vmimage.KERNEL).write_bytes(KERNEL)
    (folder / vmimage.INITRD).write_bytes(INITRD)
    (folder / vmimage.LAUNCH).write_bytes(launch)
    dest = tmp_path / "dest"
    dest.mkdir()
    return tmp_path / "build", dest


def _deep(depth: int) -> bytes:
    return b"\x81" * depth + b"\x00"  # a list in a list in a list ... in the place of the whole description


GOOD = cbor2.dumps(_description(), canonical=True)
HOSTILE = {
    "deep nesting": (cbor2.dumps(_description(devices=cbor2.loads(_deep(300))), canonical=True), "devices"),
    "deeper than the decoder goes": (_deep(1000), "not valid CBOR"),
    "trailing garbage": (GOOD + b"\x00", "trailing bytes"),
    "wrong top-level type": (cbor2.dumps([1, 2, 3]), "must be a map"),
    "wrong field type": (cbor2.dumps(_description(kernel="00" * 32), canonical=True), "kernel must be a byte string"),
    "short digest": (cbor2.dumps(_description(initrd=b"\x00"), canonical=True), "initrd must be 32 bytes"),
    "unknown field": (cbor2.dumps(_description(extra=1), canonical=True), "unknown field"),
    "not a text command line": (cbor2.dumps(_description(cmdline=7), canonical=True), "cmdline"),
    "too large": (cbor2.dumps(_description(cmdline="x" * (64 << 10)), canonical=True), "at most"),
}


def test_a_good_description_loads(tmp_path: Path) -> None:
    build, dest = _build(tmp_path, GOOD)
    description, kernel, initrd = vmimage.load(build, vmimage.measure(cbor2.loads(GOOD)), dest)
    assert description == _description() and kernel.read_bytes() == KERNEL and initrd.read_bytes() == INITRD


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_description_is_one_integrity_error(tmp_path: Path, case: str) -> None:
    """Even with the measurement of exactly these bytes signed, each is refused by name before it is used."""
    launch, words = HOSTILE[case]
    build, dest = _build(tmp_path, launch)
    try:
        expected = vmimage.measure(cbor2.loads(launch))
    except Exception:  # not decodable here either: any measurement
        expected = bytes(32)
    with pytest.raises(IntegrityError, match=words) as caught:
        vmimage.load(build, expected, dest)
    assert "\n" not in str(caught.value) and "vm/launch.cbor" in str(caught.value)


def test_a_missing_description_says_build(tmp_path: Path) -> None:
    build, dest = _build(tmp_path, GOOD)
    (build / vmimage.FOLDER / vmimage.LAUNCH).unlink()
    with pytest.raises(IntegrityError, match="vm/launch.cbor is missing"):
        vmimage.load(build, bytes(32), dest)
