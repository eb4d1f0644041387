"""`cove add`: copy programs, what they load, and whole trees into an image.

Work happens in two steps so nothing is ever half-copied: :func:`plan` checks
every source and resolves every dependency without writing anything;
:func:`apply` then copies, and on any failure removes what it created and
puts back what it replaced. Paths inside the image are resolved with the
image as root, so a symlink in the image can never send a copy to the host.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cove.decode import decode_toml
from cove.errors import CoveError, file_system_error
from cove.image import elf
from cove.image.paths import check_name, resolve_in_image

FILE, DIRECTORY, SYMLINK = "file", "dir", "symlink"


@dataclass(frozen=True)
class CopyItem:
    source: str  # absolute host path
    dest: str  # absolute path inside the image
    kind: str


@dataclass
class Plan:
    items: list[CopyItem] = field(default_factory=list)
    library_dirs: set[str] = field(default_factory=set)  # need an ld.so.cache in the image
    notes: list[str] = field(default_factory=list)  # worth telling the user, not fatal
    _by_dest: dict[str, CopyItem] = field(default_factory=dict)

    def add(self, item: CopyItem) -> bool:
        """Record item; False if an identical one is already planned."""
        check_name(item.dest, item.source)
        if item.kind == SYMLINK:
            check_name(os.readlink(item.source), f"{item.source} -> {os.readlink(item.source)}")
        existing = self._by_dest.get(item.dest)
        if existing is not None:
            if existing == item:
                return False
            if existing.kind == DIRECTORY and item.kind == DIRECTORY:
                return False
            raise CoveError(
                f"two sources want {item.dest} in the image: {existing.source} and {item.source}",
                "use --to to place one of them elsewhere",
            )
        self._by_dest[item.dest] = item
        self.items.append(item)
        return True


@dataclass(frozen=True)
class AddResult:
    files: int
    bytes: int
    unchanged: int


def _check_readable(path: str, directory: bool) -> None:
    if not os.path.lexists(path):
        raise CoveError(f"{path}: no such file or directory")
    if os.path.islink(path):
        return
    if not os.access(path, os.R_OK | (os.X_OK if directory else 0)):
        raise CoveError(f"{path}: permission denied", "run cove add as a user who can read it")


class _Planner:
    def __init__(self, with_dependencies: bool):
        self.plan = Plan()
        self.with_dependencies = with_dependencies
        self.covered: set[str] = set()  # libraries whose own needs a transitive walk already found
        self.trees: list[str] = []  # folders being copied whole: what they hold comes with them
        self._tree_names: dict[str, set[str]] = {}  # tree -> the file names it holds (built on a miss)
        self._missing: dict[tuple[str, str], tuple[int, int]] = {}  # (tree, library) -> (its note, files)

    def add_path(self, source: str, dest: str, tree_root: str | None = None) -> None:
        _check_readable(source, os.path.isdir(source))
        if os.path.islink(source):
            self._add_symlink(source, dest, tree_root)
        elif os.path.isdir(source):
            self._add_tree(source, dest)
        elif os.path.isfile(source):
            self._add_file(source, dest)
        else:
            raise CoveError(
                f"{source}: not a regular file, folder or symlink", "devices and fifos cannot go into an image"
            )

    def _add_symlink(self, source: str, dest: str, tree_root: str | None) -> None:
        if dest != source and tree_root is None:
            # An explicitly named link placed elsewhere: copy what it points to.
            self.add_path(os.path.realpath(source), dest)
            return
        if not self.plan.add(CopyItem(source, dest, SYMLINK)):
            return
        target = os.readlink(source)
        resolved = os.path.normpath(os.path.join(os.path.dirname(source), target))
        inside_tree = tree_root is not None and (resolved + "/").startswith(tree_root.rstrip("/") + "/")
        if not inside_tree and os.path.exists(resolved):
            self.add_path(resolved, resolved)

    def _in_tree(self, path: str) -> bool:
        real = os.path.realpath(path)
        return any((p + "/").startswith(tree + "/") for tree in self.trees for p in (os.path.normpath(path), real))

    def _add_tree(self, source: str, dest: str) -> None:
        self.plan.add(CopyItem(source, dest, DIRECTORY))
        self.trees += [os.path.normpath(source), os.path.realpath(source)]
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, source)
            dest_dir = dest if rel_dir == "." else os.path.join(dest, rel_dir)
            for name in dirnames + sorted(filenames):
                child = os.path.join(dirpath, name)
                child_dest = os.path.join(dest_dir, name)
                _check_readable(child, os.path.isdir(child) and not os.path.islink(child))
                if os.path.islink(child):
                    self._add_symlink(child, child_dest, tree_root=source)
                elif os.path.isdir(child):
                    self.plan.add(CopyItem(child, child_dest, DIRECTORY))
                elif os.path.isfile(child):
                    self._add_file(child, child_dest, in_tree=source)
                else:
                    raise CoveError(
                        f"{child}: not a regular file, folder or symlink", "devices and fifos cannot go into an image"
                    )

    def _add_file(self, source: str, dest: str, in_tree: str | None = None) -> None:
        if not self.plan.add(CopyItem(source, dest, FILE)):
            return
        if not self.with_dependencies or os.path.realpath(source) in self.covered:
            return
        try:
            deps = elf.dependencies(source)
        except elf.MissingLibrary as missing:
            if in_tree is None:
                raise
            # Inside a tree (a JDK, a Python installation) a library may be found
            # by soname after the program loads it itself, or be an optional
            # plugin's: say so once per library, unless the tree brings it along
            # (a JDK's lib/*.so need lib/server/libjvm.so, which java loads first).
            self._note_missing(in_tree, source, missing.library)
            deps = elf.dependencies(source, tolerate_missing=True)
        if deps is None:
            return
        self.covered.update(os.path.realpath(p) for p in deps.libraries)
        if deps.interpreter:
            self.covered.add(os.path.realpath(deps.interpreter))
            self.add_path(deps.interpreter, deps.interpreter)
        for library in deps.libraries:
            if self._in_tree(library):
                continue  # found through $ORIGIN inside a tree that is copied whole, to its place there
            if os.path.dirname(library) not in elf.LOADER_DIRS:
                self.plan.library_dirs.add(os.path.dirname(library))
            self.add_path(library, library)
        for library in deps.loaded_at_run_time:
            if os.path.realpath(library) not in self.covered:
                self.add_path(library, library)

    def _note_missing(self, tree: str, source: str, library: str) -> None:
        if tree not in self._tree_names:
            self._tree_names[tree] = {name for _, _, files in os.walk(tree) for name in files}
        if library in self._tree_names[tree]:
            return
        index, count = self._missing.get((tree, library), (len(self.plan.notes), 0))
        self._missing[(tree, library)] = (index, count + 1)
        note = (
            f"{source}: {library} not found on this host"
            if count == 0
            else f"{library} not found on this host, needed by {count + 1} files in {tree}"
        )
        note += "; fine if the program loads it itself"
        if count == 0:
            self.plan.notes.append(note)
        else:
            self.plan.notes[index] = note


def _dest_for(path: str, to: str | None) -> str:
    source = os.path.abspath(path)
    name = os.path.basename(source.rstrip("/"))
    if to is not None:
        return str(PurePosixPath(to) / name)
    if os.path.isabs(path):
        return source
    if os.path.isdir(path) and not os.path.islink(path):
        raise CoveError(f"{path}: a relative folder needs a place in the image", "pass --to /opt/NAME")
    return f"/bin/{name}"


def plan(paths: list[str], to: str | None = None, with_dependencies: bool = True) -> Plan:
    """Resolve every source and dependency; writes nothing."""
    if to is not None and not to.startswith("/"):
        raise CoveError(f"--to {to}: must be an absolute path inside the image, e.g. /opt/app")
    planner = _Planner(with_dependencies)
    for path in paths:
        planner.add_path(os.path.abspath(path), _dest_for(path, to))
    return planner.plan


SDK_DIR = "/usr/lib/python3/dist-packages"  # on Debian's Python's sys.path (docs/attestation.md)


def plan_sdk(to: str | None = None) -> Plan:
    """The in-enclave Python SDK as TO/cove/enclave.py, so `from cove import enclave` works in the image."""
    spec = importlib.util.find_spec("cove.enclave")
    if spec is None or spec.origin is None:  # it is part of this package, so never
        raise CoveError("the in-enclave SDK (cove.enclave) is not installed with Cove")
    return plan([spec.origin], to=str(PurePosixPath(to or SDK_DIR) / "cove"), with_dependencies=False)


def plan_bom(bom_file: Path, with_dependencies: bool = True) -> Plan:
    """A plan from a checked-in list: [[copy]] from = "...", to = "/dir" (optional)."""
    try:
        text = bom_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CoveError(f"{bom_file}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CoveError(f"{bom_file}: cannot read: {exc}") from None

    def unreadable(problem: str) -> CoveError:
        return CoveError(f"{bom_file}: cannot read: {problem}")

    data = decode_toml(text, unreadable, "")  # nested too deep or malformed: one line
    unknown = set(data) - {"copy"}
    if unknown:
        raise CoveError(f"{bom_file}: unknown key {sorted(unknown)[0]}", "a bom holds [[copy]] tables only")
    copies = data.get("copy", [])
    if not isinstance(copies, list):
        raise CoveError(f"{bom_file}: copy must be [[copy]] tables", "a bom holds [[copy]] tables only")
    planner = _Planner(with_dependencies)
    for index, item in enumerate(copies):
        if not isinstance(item, dict) or not isinstance(item.get("from"), str) or set(item) - {"from", "to"}:
            raise CoveError(f'{bom_file}: copy[{index}] needs from = "PATH" and optionally to = "/DIR"')
        to = item.get("to")
        if to is not None and (not isinstance(to, str) or not to.startswith("/")):
            raise CoveError(f"{bom_file}: copy[{index}].to must be an absolute path inside the image")
        source = item["from"]
        if not os.path.isabs(source):
            source = str(bom_file.parent / source)
        if to is None and not os.path.isabs(item["from"]):
            raise CoveError(f'{bom_file}: copy[{index}] has a relative source; give to = "/DIR"')
        planner.add_path(os.path.abspath(source), _dest_for(source, to))
    return planner.plan


def _same_file(source: str, dest: Path) -> bool:
    try:
        a, b = os.stat(source), os.lstat(dest)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(b.st_mode) or a.st_size != b.st_size or a.st_mode != b.st_mode:
        return False
    with open(source, "rb") as x, open(dest, "rb") as y:
        while True:
            chunk = x.read(1 << 20)
            if chunk != y.read(1 << 20):
                return False
            if not chunk:
                return True


def plan_bytes(the_plan: Plan) -> int:
    """How many bytes applying the plan copies at most (for a progress bar)."""
    return sum(os.path.getsize(item.source) for item in the_plan.items if item.kind == FILE)


def apply(image: Path, the_plan: Plan, progress: Callable[[int], object] | None = None) -> AddResult:
    """Copy a plan into the image; all or nothing. ``progress`` is told the bytes of each file copied."""
    created: list[Path] = []
    replaced: list[tuple[Path, Path]] = []
    backup = Path(tempfile.mkdtemp(prefix=".cove-add-", dir=image.parent))
    files = size = unchanged = 0
    try:
        for item in the_plan.items:
            dest = resolve_in_image(image, item.dest)
            _make_parents(image, dest, created)
            if item.kind == DIRECTORY:
                if os.path.isdir(dest) and not os.path.islink(dest):
                    continue
                _set_aside(dest, backup, replaced)
                dest.mkdir(mode=0o755)
                created.append(dest)
                os.chmod(dest, stat.S_IMODE(os.stat(item.source).st_mode) | 0o700)
            elif item.kind == SYMLINK:
                target = os.readlink(item.source)
                if os.path.islink(dest) and os.readlink(dest) == target:
                    continue
                _set_aside(dest, backup, replaced)
                os.symlink(target, dest)
                created.append(dest)
            else:
                if _same_file(item.source, dest):
                    unchanged += 1
                    continue
                _set_aside(dest, backup, replaced)
                tmp = dest.with_name(f".{dest.name}.cove-tmp")
                try:
                    shutil.copyfile(item.source, tmp)
                    os.chmod(tmp, stat.S_IMODE(os.stat(item.source).st_mode))
                    os.rename(tmp, dest)
                except OSError as exc:
                    _remove(tmp)
                    if exc.filename is None:  # inside the copy: a full or read-only disk is the destination's
                        writing = exc.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT)
                        exc.filename = str(dest) if writing else item.source
                    raise
                created.append(dest)
                files += 1
                size += os.path.getsize(dest)
                if progress is not None:
                    progress(os.path.getsize(dest))
        if the_plan.library_dirs:
            _write_loader_cache(image, the_plan.library_dirs)
    except BaseException as exc:
        for path in reversed(created):
            _remove(path)
        for original, saved in reversed(replaced):
            os.rename(saved, original)
        shutil.rmtree(backup, ignore_errors=True)
        if isinstance(exc, OSError):
            error = file_system_error(exc)
            raise type(error)(f"copy failed, nothing was added: {error.message}", error.hint) from None
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return AddResult(files, size, unchanged)


def _make_parents(image: Path, dest: Path, created: list[Path]) -> None:
    missing = []
    parent = dest.parent
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise CoveError(f"{parent.relative_to(image)} in the image is not a folder")
    for directory in reversed(missing):
        directory.mkdir(mode=0o755)
        created.append(directory)


def _set_aside(dest: Path, backup: Path, replaced: list[tuple[Path, Path]]) -> None:
    if os.path.lexists(dest):
        saved = backup / str(len(replaced))
        os.rename(dest, saved)
        replaced.append((dest, saved))


def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def _write_loader_cache(image: Path, directories: set[str]) -> None:
    """Give the image an ld.so.cache for libraries outside the loader's default folders."""
    conf_dir = image / "etc" / "ld.so.conf.d"
    conf_dir.mkdir(parents=True, exist_ok=True)
    (image / "etc" / "ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
    conf = conf_dir / "cove.conf"
    existing = set(conf.read_text().split()) if conf.exists() else set()
    conf.write_text("".join(f"{d}\n" for d in sorted(existing | directories)))
    result = subprocess.run(
        ["ldconfig", "-X", "-r", str(image)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"},
    )
    if result.returncode != 0:
        raise CoveError(f"ldconfig could not write the image's loader cache: {result.stderr.strip()}")
