"""Finding what an ELF program needs, the way the dynamic loader would.

ELF headers are read with pyelftools. Libraries are searched like glibc's
ld.so does: DT_RPATH (only when there is no DT_RUNPATH) of the object and of
the executable, DT_RUNPATH of the object, the loader cache (``ldconfig -p``),
then the default directories. LD_LIBRARY_PATH is ignored on purpose: an image
must not depend on the shell that built it.

pyelftools loads only when a build reads dynamic sections (about 18 ms of CPU):
the launch-time check needs just the program's PT_INTERP, which
:func:`program_interpreter` reads from the two fixed-size headers, with the
kernel's own bounds (docs/performance.md).
"""

from __future__ import annotations

import functools
import os
import re
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from cove.errors import CannotExecuteError, CoveError
from cove.image.paths import resolve_in_image

ELF_MAGIC = b"\x7fELF"
DEFAULT_DIRS_64 = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib")
DEFAULT_DIRS_32 = ("/lib/i386-linux-gnu", "/usr/lib/i386-linux-gnu", "/lib32", "/usr/lib32", "/lib", "/usr/lib")
# Directories the loader searches with no cache at all; libraries found
# elsewhere need an ld.so.cache inside the image (see cove.image.bom).
LOADER_DIRS = frozenset(DEFAULT_DIRS_64 + DEFAULT_DIRS_32)
# Libraries glibc itself opens with dlopen at run time, so no DT_NEEDED names
# them: libgcc_s for unwinding at pthread_exit and pthread_cancel (without it
# a threaded program aborts), and the NSS modules behind getpwnam and
# getaddrinfo. Occlum's copy_bom brings the same set. Those the host lacks
# are skipped: glibc copes without them.
RUNTIME_LOADS = {
    "libc.so.6": ("libgcc_s.so.1", "libnss_files.so.2", "libnss_dns.so.2", "libnss_compat.so.2"),
}


class MissingLibrary(CoveError):
    """A DT_NEEDED library the loader would not find."""

    def __init__(self, path: str, library: str):
        super().__init__(
            f"{path}: needs {library}, which the loader would not find on this host",
            "install the library, or add it with `cove add` and a matching RUNPATH",
        )
        self.library = library


@dataclass(frozen=True)
class ElfInfo:
    path: str
    elfclass: int  # 32 or 64
    machine: str
    interpreter: str | None
    needed: tuple[str, ...] = ()
    rpath: tuple[str, ...] = ()
    runpath: tuple[str, ...] = ()


@dataclass
class Dependencies:
    """Everything an ELF file needs at load time, by absolute host path."""

    interpreter: str | None = None
    libraries: list[str] = field(default_factory=list)
    loaded_at_run_time: list[str] = field(default_factory=list)  # see RUNTIME_LOADS


def is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == ELF_MAGIC
    except OSError:
        return False


def read_elf(path: str) -> ElfInfo | None:
    """Parse the headers that matter for loading; None when path is not ELF."""
    if not is_elf(Path(path)):
        return None
    from elftools.common.exceptions import ELFError
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile
    from elftools.elf.segments import InterpSegment

    try:
        with open(path, "rb") as handle:
            elf = ELFFile(handle)
            interpreter = None
            for segment in elf.iter_segments():
                if isinstance(segment, InterpSegment):  # PT_INTERP
                    interpreter = segment.get_interp_name()
            needed: list[str] = []
            rpath: list[str] = []
            runpath: list[str] = []
            for section in elf.iter_sections():
                if not isinstance(section, DynamicSection):
                    continue
                for tag in section.iter_tags():
                    # pyelftools sets these attributes per tag kind, so its types do not declare them
                    if tag.entry.d_tag == "DT_NEEDED":
                        needed.append(tag.needed)  # type: ignore[attr-defined]
                    elif tag.entry.d_tag == "DT_RPATH":
                        rpath.extend(p for p in tag.rpath.split(":") if p)  # type: ignore[attr-defined]
                    elif tag.entry.d_tag == "DT_RUNPATH":
                        runpath.extend(p for p in tag.runpath.split(":") if p)  # type: ignore[attr-defined]
            return ElfInfo(
                path, elf.elfclass, elf["e_machine"], interpreter, tuple(needed), tuple(rpath), tuple(runpath)
            )
    except (ELFError, OSError, ValueError, KeyError) as exc:
        raise CoveError(f"{path}: cannot read ELF headers: {exc}") from None


PT_INTERP = 3
PATH_MAX = 4096  # the kernel refuses a PT_INTERP longer than this, or shorter than 2 bytes
_MAX_PHDRS = 65536  # bytes of program headers the kernel reads at most (fs/binfmt_elf.c)
# By EI_CLASS: the ELF header after e_ident (e_phoff, e_phentsize, e_phnum picked out), one program header's
# size and format (p_type, p_offset, p_filesz picked out).
_LAYOUTS = {
    1: ("HHIIIIIHHHHHH", 32, "IIIIIIII", (0, 1, 4)),
    2: ("HHIQQQIHHHHHH", 56, "IIQQQQQQ", (0, 2, 5)),
}


def program_interpreter(path: Path) -> str | None:
    """The loader an ELF program names in its first PT_INTERP, as the kernel's exec reads it; None when path
    is not ELF or names none (a static program). CoveError for what the kernel would refuse to load.

    Reads the ELF header, at most 64 KiB of program headers and at most PATH_MAX bytes of the name: the
    kernel's own bounds, so a hostile file costs nothing more than a real one.
    """
    try:
        with open(path, "rb") as handle:
            ident = handle.read(64)
            if ident[:4] != ELF_MAGIC:
                return None
            layout = _LAYOUTS.get(ident[4])
            if layout is None or ident[5] not in (1, 2):
                raise CoveError(f"{path}: not a 32- or 64-bit ELF file of a known byte order")
            header, entry_size, entry, (at_type, at_offset, at_size) = layout
            order = "<" if ident[5] == 1 else ">"
            need = 16 + struct.calcsize(order + header)
            if len(ident) < need:
                raise CoveError(f"{path}: truncated ELF header")
            fields = struct.unpack_from(order + header, ident, 16)
            phoff, phentsize, phnum = fields[4], fields[8], fields[9]
            if phnum == 0:
                return None  # an object file: nothing to load
            if phentsize != entry_size or phnum * entry_size > _MAX_PHDRS:
                raise CoveError(f"{path}: ELF program headers of {phnum} x {phentsize} bytes")
            handle.seek(phoff)
            table = handle.read(phnum * entry_size)
            if len(table) != phnum * entry_size:
                raise CoveError(f"{path}: truncated ELF program headers")
            for one in struct.iter_unpack(order + entry, table):
                if one[at_type] != PT_INTERP:
                    continue
                size = one[at_size]
                if not 2 <= size <= PATH_MAX:
                    raise CoveError(f"{path}: PT_INTERP of {size} bytes")
                handle.seek(one[at_offset])
                name = handle.read(size)
                if len(name) != size or name[-1] != 0:
                    raise CoveError(f"{path}: PT_INTERP is truncated or not NUL-terminated")
                return os.fsdecode(name.split(b"\0", 1)[0])
            return None
    except (OSError, OverflowError, ValueError) as exc:
        raise CoveError(f"{path}: cannot read ELF headers: {exc}") from None


@functools.lru_cache(maxsize=1)
def loader_cache() -> dict[tuple[str, int], str]:
    """The host's ld.so.cache as {(soname, elfclass): path}."""
    try:
        output = subprocess.run(
            ["ldconfig", "-p"],
            capture_output=True,
            text=True,
            check=True,
            env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"},
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    cache: dict[tuple[str, int], str] = {}
    for line in output.splitlines():
        match = re.match(r"^\s+(\S+) \(([^)]*)\) => (\S+)$", line)
        if not match:
            continue
        name, flags, target = match.groups()
        elfclass = 64 if ("64" in flags) else 32
        cache.setdefault((name, elfclass), target)
    return cache


def _expand(entry: str, origin: str, elfclass: int) -> str:
    lib = "lib64" if elfclass == 64 else "lib"
    platform = "x86_64" if elfclass == 64 else "i686"
    for token, value in (("ORIGIN", origin), ("LIB", lib), ("PLATFORM", platform)):
        entry = entry.replace("${" + token + "}", value).replace("$" + token, value)
    return entry


def _compatible(path: str, wanted: ElfInfo) -> bool:
    try:
        info = read_elf(path)
    except CoveError:
        return False
    return info is not None and info.elfclass == wanted.elfclass and info.machine == wanted.machine


def _find(name: str, obj: ElfInfo, executable: ElfInfo) -> str | None:
    if "/" in name:
        return name if os.path.exists(name) else None
    origin = os.path.dirname(obj.path)
    directories: list[str] = []
    if not obj.runpath:
        directories += [_expand(p, origin, obj.elfclass) for p in obj.rpath]
        if executable is not obj and not executable.runpath:
            exe_origin = os.path.dirname(executable.path)
            directories += [_expand(p, exe_origin, obj.elfclass) for p in executable.rpath]
    directories += [_expand(p, origin, obj.elfclass) for p in obj.runpath]
    for directory in directories:
        candidate = os.path.join(directory, name)
        if os.path.exists(candidate) and _compatible(candidate, obj):
            return os.path.normpath(candidate)
    cached = loader_cache().get((name, obj.elfclass))
    if cached and os.path.exists(cached) and _compatible(cached, obj):
        return cached
    for directory in DEFAULT_DIRS_64 if obj.elfclass == 64 else DEFAULT_DIRS_32:
        candidate = os.path.join(directory, name)
        if os.path.exists(candidate) and _compatible(candidate, obj):
            return candidate
    return None


def dependencies(path: str, tolerate_missing: bool = False) -> Dependencies | None:
    """The interpreter and the transitive shared libraries of an ELF file (None if not ELF)."""
    executable = read_elf(path)
    if executable is None:
        return None
    result = Dependencies(interpreter=executable.interpreter)
    seen: set[str] = set()
    queue = [executable]
    while queue:
        obj = queue.pop(0)
        for name in obj.needed:
            found = _find(name, obj, executable)
            if found is None:
                if tolerate_missing:
                    continue
                raise MissingLibrary(path, name)
            if found in seen:
                continue
            seen.add(found)
            result.libraries.append(found)
            info = read_elf(found)
            if info is not None:
                queue.append(info)
            for extra in RUNTIME_LOADS.get(name, ()):
                loaded = _find(extra, info or obj, executable)
                if loaded is not None and loaded not in result.loaded_at_run_time:
                    result.loaded_at_run_time.append(loaded)
    return result


def script_interpreter(path: Path) -> str | None:
    """The program a `#!` line names, or None when path is not a script."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].split()
    return words[0].decode("utf-8", "replace") if words else None


def missing_interpreter(image: Path, program: str) -> str | None:
    """What the kernel would need to start program (its `#!` interpreter or its ELF loader)
    and the image lacks; None when all is there. Without it exec fails with ENOENT."""
    path = resolve_in_image(image, program, follow_last=True)
    interpreter = script_interpreter(path)
    if interpreter is None:
        try:
            interpreter = program_interpreter(path)
        except CoveError:
            return None
    if interpreter is None:
        return None
    if not interpreter.startswith("/"):
        return None  # relative to the caller's folder: nothing to check here
    found = resolve_in_image(image, interpreter, follow_last=True)
    return None if found.is_file() and os.access(found, os.X_OK) else interpreter


def check_startable(image: Path, program: str) -> None:
    """Refuse, with the sandbox's code for it, a program whose interpreter the image lacks
    (the kernel's ENOENT would otherwise surface as the sandbox's own message)."""
    interpreter = missing_interpreter(image, program)
    if interpreter is not None:
        raise CannotExecuteError(
            f"{program} needs {interpreter}, which is not in the image",
            f"add it with `cove add {interpreter}` and rebuild",
        )
