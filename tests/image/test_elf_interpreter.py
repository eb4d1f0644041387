"""The launch-time PT_INTERP reader (cove.image.elf.program_interpreter): the same answer as pyelftools on real
programs, and the kernel's refusals, bounded, for hostile headers."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from cove.errors import CannotExecuteError, CoveError
from cove.image import elf

ELF64 = ("<", "HHIQQQIHHHHHH", "IIQQQQQQ", 56)


def hand_made(
    tmp_path: Path,
    interps: list[bytes],
    *,
    order: str = "<",
    elfclass: int = 2,
    phentsize: int | None = None,
    phnum: int | None = None,
    size: int | None = None,
    offset: int | None = None,
) -> Path:
    """An ELF file of one PT_LOAD and a PT_INTERP per name (fields overridable to make it hostile)."""
    header, entry, entry_size = ("HHIIIIIHHHHHH", "IIIIIIII", 32) if elfclass == 1 else ELF64[1:]
    ehsize = 16 + struct.calcsize("<" + header)
    count = 1 + len(interps)
    data_at = ehsize + count * entry_size
    table = b""
    names = b""
    kinds = [(1, b"")] + [(elf.PT_INTERP, name) for name in interps]
    for kind, name in kinds:
        where, length = (
            (offset if offset is not None else data_at + len(names)),
            (size if size is not None else len(name)),
        )
        if elfclass == 1:
            table += struct.pack(order + entry, kind, where, 0, 0, length, length, 4, 1)
        else:
            table += struct.pack(order + entry, kind, 4, where, 0, 0, length, length, 1)
        names += name
    ident = b"\x7fELF" + bytes([elfclass, 1 if order == "<" else 2, 1]) + bytes(9)
    fields = (2, 62, 1, 0, ehsize, 0, 0, ehsize, phentsize or entry_size, count if phnum is None else phnum, 0, 0, 0)
    path = tmp_path / "prog"
    path.write_bytes(ident + struct.pack(order + header, *fields) + table + names)
    return path


def real_programs() -> list[str]:
    found = [sys.executable, "/bin/sh", "/usr/bin/env", "/usr/lib/x86_64-linux-gnu/libc.so.6"]
    return [str(Path(p).resolve()) for p in found if Path(p).exists()]


@pytest.mark.parametrize("program", real_programs())
def test_the_interpreter_is_what_pyelftools_reads(program):
    info = elf.read_elf(program)
    assert info is not None
    assert elf.program_interpreter(Path(program)) == info.interpreter


def test_a_static_program_names_no_interpreter(tmp_path):
    if not shutil.which("gcc"):
        pytest.fail("gcc is missing: run scripts/setup")
    out = tmp_path / "static"
    subprocess.run(
        ["gcc", "-static", "-O2", "-x", "c", "-o", str(out), "-"], input=b"int main(void){return 0;}\n", check=True
    )
    assert elf.program_interpreter(out) is None
    assert elf.read_elf(str(out)).interpreter is None


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("elfclass", [1, 2])
def test_both_classes_and_byte_orders_and_the_first_interpreter_wins(tmp_path, order, elfclass):
    """The kernel's exec takes the first PT_INTERP; the name ends at its first NUL."""
    path = hand_made(tmp_path, [b"/lib/ld-first.so\0", b"/lib/ld-second.so\0"], order=order, elfclass=elfclass)
    assert elf.program_interpreter(path) == "/lib/ld-first.so"
    assert elf.program_interpreter(hand_made(tmp_path, [b"/a\0junk\0"], order=order, elfclass=elfclass)) == "/a"


def test_not_elf_or_no_program_headers_is_none(tmp_path):
    script = tmp_path / "script"
    script.write_bytes(b"#!/bin/sh\n")
    assert elf.program_interpreter(script) is None
    assert elf.program_interpreter(hand_made(tmp_path, [b"/x\0"], phnum=0)) is None


HOSTILE = {
    "truncated header": lambda p: p.write_bytes(p.read_bytes()[:40]),
    "unknown class": lambda p: p.write_bytes(p.read_bytes()[:4] + b"\x09" + p.read_bytes()[5:]),
    "unknown byte order": lambda p: p.write_bytes(p.read_bytes()[:5] + b"\x07" + p.read_bytes()[6:]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_identification_is_refused(tmp_path, case):
    path = hand_made(tmp_path, [b"/lib/ld.so\0"])
    HOSTILE[case](path)
    with pytest.raises(CoveError, match="ELF"):
        elf.program_interpreter(path)


@pytest.mark.parametrize(
    "fields",
    [
        {"phentsize": 40},  # not the size of a program header: the kernel says ENOEXEC
        {"phnum": 0xFFFF},  # 3.6 MB of program headers: more than the kernel reads, so nothing is read
        {"phnum": 50},  # more program headers than the file holds
        {"size": 1},  # shorter than the kernel allows
        {"size": 4097},  # longer than PATH_MAX: never read
        {"size": 1 << 62},
        {"offset": 1 << 40},  # past the end of the file
        {"offset": 1 << 63},  # past what a seek can reach
    ],
    ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()),
)
def test_hostile_program_headers_are_refused_and_bounded(tmp_path, fields):
    with pytest.raises(CoveError, match="ELF|PT_INTERP"):
        elf.program_interpreter(hand_made(tmp_path, [b"/lib/ld.so\0"], **fields))


def test_an_unterminated_interpreter_is_refused(tmp_path):
    with pytest.raises(CoveError, match="NUL"):
        elf.program_interpreter(hand_made(tmp_path, [b"/lib/ld.so"]))


def test_check_startable_names_the_missing_loader_and_tolerates_what_the_kernel_refuses(tmp_path):
    image = tmp_path / "image"
    (image / "bin").mkdir(parents=True)
    program = hand_made(image / "bin", [b"/lib/ld-missing.so\0"])
    with pytest.raises(CannotExecuteError, match="/lib/ld-missing.so"):
        elf.check_startable(image, "/bin/prog")
    (image / "lib").mkdir()
    loader = image / "lib" / "ld-missing.so"
    loader.write_bytes(b"")
    loader.chmod(0o755)
    elf.check_startable(image, "/bin/prog")
    program.write_bytes(program.read_bytes()[:40])  # the sandbox's exec reports what the kernel refuses
    elf.check_startable(image, "/bin/prog")
