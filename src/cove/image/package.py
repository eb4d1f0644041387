"""`cove package`: a deployable archive of a built instance, and its safe extraction.

The archive holds cove.toml, build/ (manifest, signature, listing) and image/,
or, for a build made with --encrypt-image, build/image.enc and build/image.key
instead of image/ (the plain image never ships); a vm build adds build/vm
(kernel, initramfs, launch description).
It is written deterministically (sorted, zero times and owners) and trusted
for nothing: `cove run --package` extracts it into a private folder and
verifies it exactly like an instance.
"""

from __future__ import annotations

import errno
import os
import shutil
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

from cove.errors import CoveError, NotFoundError
from cove.image import artifacts, encryption, vmimage
from cove.image.instance import Instance

MEMBERS = ("cove.toml", "build/" + artifacts.MANIFEST, "build/" + artifacts.SIGNATURE, "build/" + artifacts.TREE)
# a vm build's launch inputs; `cove run` checks them against the signed launch measurement
VM_MEMBERS = tuple(f"build/{vmimage.FOLDER}/{name}" for name in (vmimage.KERNEL, vmimage.INITRD, vmimage.LAUNCH))


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def create(instance: Instance, out: Path, allow_debug: bool = False) -> artifacts.VerifiedBuild:
    """Write the package after checking the build still matches the instance."""
    verified = artifacts.load_verified(instance.build_dir, instance.config_path)
    if verified.config.enclave.debug and not allow_debug:
        raise CoveError("refusing to package a debug enclave", "set debug = false and rebuild, or pass --debug-enclave")
    from cove.image.staging import stage

    encrypted = encryption.find(instance.build_dir)
    if encrypted is None:
        stage(instance.image, verified.entries, verified.manifest.image_root, None)
        tree, arcroot = instance.image, "image"
    else:  # only ciphertext ships; `cove run` checks every byte against the signed listing
        tree, arcroot = encrypted.volume, "build/" + encryption.ENCRYPTED_IMAGE
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else ".")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT) as archive:
            members = MEMBERS + (() if encrypted is None else ("build/" + encryption.IMAGE_KEY,))
            for member in members + (VM_MEMBERS if verified.manifest.launch is not None else ()):
                archive.add(instance.root / member, arcname=member, filter=_normalise)
            _add_tree(archive, tree, arcroot)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return verified


def _add_tree(archive: tarfile.TarFile, tree: Path, arcroot: str) -> None:
    """A folder and everything under it, in sorted order."""
    archive.add(tree, arcname=arcroot, recursive=False, filter=_normalise)
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for name in dirnames + sorted(filenames):
            full = Path(dirpath) / name
            archive.add(full, arcname=f"{arcroot}/{full.relative_to(tree)}", recursive=False, filter=_normalise)


def _only_plain_members(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's 'tar' safety filter, and nothing but files, folders and symlinks.

    Absolute symlinks are allowed (images have them); the filter's own check
    refuses any member whose real path would leave the destination.
    """
    mode = member.mode
    member = tarfile.tar_filter(member, dest).replace(mode=mode, deep=False)  # modes are measured
    if not (member.isfile() or member.isdir() or member.issym()):
        raise tarfile.TarError(f"{member.name}: only files, folders and symlinks may be in a package")
    return member


@contextmanager
def extracted(package: Path, under: Path) -> Iterator[Path]:
    """Extract a package into a private folder (removed afterwards)."""
    if not Path(package).is_file():
        raise NotFoundError(f"{package}: no such package file")
    workdir = Path(tempfile.mkdtemp(prefix="cove-package-", dir=under))
    try:
        try:
            with tarfile.open(package, "r:gz") as archive:
                archive.extractall(workdir, filter=_only_plain_members)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # the folder's fault, not the package's
                raise
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CoveError(f"{package}: not a valid Cove package: {reason}") from None
        except (tarfile.TarError, EOFError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CoveError(f"{package}: not a valid Cove package: {reason}") from None
        for member in MEMBERS:
            if not (workdir / member).is_file():
                raise CoveError(f"{package}: not a valid Cove package: {member} is missing")
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
