"""`cove build`: hash the image, write the manifest, sign it.

A rebuild re-hashes only files whose size, mtime, ctime or inode changed
(build/hash-cache.cbor). That cache only speeds up building; `cove run`
never consults it and always hashes what it will serve.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import cbor2
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from cove import config as cove_config
from cove.decode import decode_cbor
from cove.errors import CoveError
from cove.image import elf
from cove.image import encryption as encrypted_image
from cove.image import manifest as manifest_mod
from cove.image import signing
from cove.image.artifacts import MANIFEST, SIGNATURE, TREE
from cove.image.identity import EnclaveIdentity
from cove.image.instance import Instance
from cove.image.paths import resolve_in_image
from cove.image.tree import LISTING_LIMIT, Entry, encode_entries, entry_for, hash_file, walk
from cove.util import write_atomic

CACHE = "hash-cache.cbor"
PROGRESS_THRESHOLD = 32 << 20


@dataclass(frozen=True)
class BuildResult:
    manifest: manifest_mod.Manifest
    signature: signing.Signature
    rehashed: int  # files actually read this time
    cached: int  # files whose digest came from the cache
    encrypted_with: str | None = None  # the key source of build/image.enc
    warnings: tuple[str, ...] = ()  # what may fail at run time, worth a line on stderr


@dataclass(frozen=True)
class ImageEncryption:
    """--encrypt-image: the run-time key source, and the key itself when only the enclave can resolve it."""

    source: str
    key: bytes | None = None


class _Damaged(Exception):
    """The hash cache cannot be decoded (it is rebuilt)."""


class _HashCache:
    """Digests of unchanged files from the previous build, keyed by path."""

    def __init__(self, path: Path):
        self.path = path
        self.old: dict = {}
        self.new: dict = {}
        self.hits = self.misses = 0
        try:
            old = decode_cbor(path.read_bytes(), _Damaged, "hash cache", limit=LISTING_LIMIT)
        except (OSError, _Damaged):  # a missing or damaged cache only costs time
            old = {}
        self.old = old if isinstance(old, dict) else {}

    @staticmethod
    def _key(st: os.stat_result) -> list:
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]

    def digest(self, full: Path, rel: str, st: os.stat_result, progress) -> tuple[bytes, int]:
        key = self._key(st)
        cached = self.old.get(rel)
        if (
            isinstance(cached, list)
            and len(cached) == 2
            and cached[0] == key
            and isinstance(cached[1], bytes)
            and len(cached[1]) == 32
        ):  # a damaged entry is a miss
            self.hits += 1
            digest, size = cached[1], st.st_size
        else:
            self.misses += 1
            digest, size = hash_file(full, progress)
        self.new[rel] = [key, digest]
        return digest, size

    def save(self) -> None:
        write_atomic(self.path, cbor2.dumps(self.new), mode=0o644)


def build(instance: Instance, key_path: Path | None = None, encryption: ImageEncryption | None = None) -> BuildResult:
    """Measure and sign the instance; writes build/{image.tree,manifest.cbor,manifest.sig}
    and, with ``encryption``, build/{image.enc,image.key} (see cove.image.encryption)."""
    config = instance.config()
    if not instance.image.is_dir():
        raise CoveError(f"{instance.image} is missing", "an instance needs an image/ folder")
    warnings = check_launchable(instance.image, config)
    if encryption is not None:
        encryption = ImageEncryption(encrypted_image.check_source(encryption.source, config), encryption.key)
    key_path = key_path or signing.default_key_path()
    key = signing.load_key(key_path)
    instance.build_dir.mkdir(exist_ok=True)
    encrypted_image.remove(instance.build_dir)  # an older encrypted copy no longer matches
    cache = _HashCache(instance.build_dir / CACHE)
    entries = _hash_image(instance.image, cache)
    launch = None
    if config.enclave.backend == "vm":
        from cove.image import vmimage

        # with --encrypt-image the initramfs holds no image: the guest's root is the encrypted one's view
        launch = vmimage.build(instance.image, entries, config, instance.build_dir, encrypted=encryption is not None)
    manifest = manifest_mod.make(cove_config.to_measured(config), entries, launch)
    signature = signing.sign(key, manifest.encoded)
    write_atomic(instance.build_dir / TREE, encode_entries(entries))
    write_atomic(instance.build_dir / MANIFEST, manifest.encoded)
    write_atomic(instance.build_dir / SIGNATURE, signature.encode())
    cache.save()
    if encryption is not None:
        identity = _identity(config, manifest, signature)
        encrypted_image.write(instance.image, instance.build_dir, encryption.source, identity, entries, encryption.key)
    return BuildResult(
        manifest,
        signature,
        rehashed=cache.misses,
        cached=cache.hits,
        encrypted_with=encryption.source if encryption else None,
        warnings=tuple(warnings),
    )


# Mounted over by every sim enclave, whatever cove.toml says.
SANDBOX_MOUNTS = (("/proc", "proc"), ("/dev", "dev"))
TMPFS_MODE = re.compile(r"0?[0-7]{3,4}")
MIN_MEMORY = 4 << 20  # documented in docs/config.md


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def check_launchable(image: Path, config) -> list[str]:
    """Refuse what could only fail at run time with the sandbox's own message: image content a
    mount hides, a working directory that is not there, a tmpfs mode that is not octal, a
    memory limit too small for the sandbox itself.
    Returns warnings: entry-point scripts whose `#!` interpreter is not in the image."""
    mounts = [*SANDBOX_MOUNTS, *((m.target, m.type) for m in config.mounts if m.type != "image")]
    for target, kind in mounts:
        _check_not_shadowed(image, target, kind)
    if config.resources.memory < MIN_MEMORY:
        raise CoveError(
            f"cove.toml: resources.memory is {config.resources.memory} bytes, below the minimum "
            f"of 4M (the sandbox itself needs about 1M)",
            'write e.g. memory = "64M"',
        )
    for index, mount in enumerate(config.mounts):
        mode = dict(mount.options).get("mode")
        if mount.type == "tmpfs" and mode is not None and not TMPFS_MODE.fullmatch(mode):
            raise CoveError(
                f"cove.toml: mounts[{index}].options.mode = {mode!r} is not an octal mode",
                'write it like "1777" or "0700"',
            )
    cwd = config.process.cwd
    if not any(_under(cwd, target) for target, _ in mounts):
        if not resolve_in_image(image, cwd, follow_last=True).is_dir():
            raise CoveError(
                f"cove.toml: process.cwd = {cwd!r} is not a folder in the image",
                "create it in image/ (or mount something there), or change cwd",
            )
    return _entry_point_warnings(image, config.process.entry_points)


def _check_not_shadowed(image: Path, target: str, kind: str) -> None:
    path = resolve_in_image(image, target, follow_last=True)
    if os.path.lexists(path) and not path.is_dir():
        raise CoveError(
            f"{target} in the image is not a folder, but the {kind} mount needs one there",
            f"remove image{target} or the mount",
        )
    if path.is_dir():
        for name in sorted(os.listdir(path)):
            hidden = posixpath.join(target, name)
            raise CoveError(
                f"{hidden} in the image is hidden at run time by the {kind} mount on {target}",
                "place it elsewhere (e.g. cove add --to /opt/NAME) or remove the mount; then rebuild",
            )


def _entry_point_warnings(image: Path, entry_points: tuple[str, ...]) -> list[str]:
    warnings = []
    for entry in entry_points:
        if entry.endswith("/"):
            base = resolve_in_image(image, entry, follow_last=True)
            programs = (
                [
                    posixpath.join(entry, rel)
                    for rel, st in walk(base)
                    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111
                ]
                if base.is_dir()
                else []
            )
        else:
            programs = [entry]
        for program in programs:
            path = resolve_in_image(image, program, follow_last=True)
            interpreter = elf.script_interpreter(path) if path.is_file() else None
            if interpreter and elf.missing_interpreter(image, program):
                warnings.append(
                    f"{program} starts with #!{interpreter}, which is not in the image "
                    f"(add it with `cove add {interpreter}`)"
                )
    return warnings


def _identity(config, manifest: manifest_mod.Manifest, signature: signing.Signature):
    enclave = config.enclave
    return EnclaveIdentity(
        enclave.name, manifest.measurement, signature.signer, enclave.product_id, enclave.svn, enclave.debug
    )


def _hash_image(image: Path, cache: _HashCache) -> list[Entry]:
    listing = list(walk(image))
    total = sum(st.st_size for _, st in listing if stat.S_ISREG(st.st_mode))
    show = total >= PROGRESS_THRESHOLD and sys.stderr.isatty()
    with Progress(
        TextColumn("hashing image"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        disable=not show,
        transient=True,
    ) as progress:
        task = progress.add_task("hash", total=total)

        def advance(chunk: bytes) -> None:
            progress.advance(task, len(chunk))

        def digest_of(full: Path, rel: str, st: os.stat_result) -> tuple[bytes, int]:
            return cache.digest(full, rel, st, advance)

        return [entry_for(image, rel, st, digest_of) for rel, st in listing]
