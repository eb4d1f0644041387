"""`cove package --oci`: a built instance as an OCI image (layout folder or loadable tarball).

The image has one uncompressed layer: the signed image tree at `/` and the
signed build (cove.toml, manifest, signature, listing) under `/.cove/`. For a
build made with --encrypt-image the layer holds no plain image at all, only
`/.cove/image.enc/` and its key recipe. Nothing in the image is trusted:
`cove-runtime` checks the layer against the signed manifest before anything
runs. Every byte is a function of the signed build (entries sorted, mtimes
0, owner 0, modes from the signed listing, files hashed while written and
compared with it), so the same instance gives the same digest anywhere.
The tarball holds the OCI layout and Docker's manifest.json side by side, as
`docker save` does, so `podman load` and `ctr image import` both read it.
Format: docs/formats/oci.md.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import platform
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cove.errors import CoveError, IntegrityError
from cove.image import artifacts, encryption
from cove.image.artifacts import VerifiedBuild
from cove.image.instance import Instance
from cove.image.encryption import EncryptedImage
from cove.image.tree import CHUNK, DIRECTORY, FILE, SYMLINK, Entry
from cove.oci import COVE_DIR, DOMAIN

LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
BUILD_FILES = (artifacts.MANIFEST, artifacts.SIGNATURE, artifacts.TREE)
EPOCH = "1970-01-01T00:00:00Z"
ARCHITECTURES = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


@dataclass(frozen=True)
class OciImage:
    """What was written: the manifest digest (the image's digest) and its annotations."""

    digest: str
    tag: str
    annotations: dict[str, str]


def manifest_annotations(verified: VerifiedBuild, encrypted: bool) -> dict[str, str]:
    """The image manifest's annotations (also the config's labels), all strings."""
    enclave = verified.config.enclave
    return {
        f"{DOMAIN}/measurement": verified.measurement.hex(),
        f"{DOMAIN}/signer": verified.signer.hex(),
        f"{DOMAIN}/name": enclave.name,
        f"{DOMAIN}/product-id": str(enclave.product_id),
        f"{DOMAIN}/svn": str(enclave.svn),
        f"{DOMAIN}/debug": "true" if enclave.debug else "false",
        f"{DOMAIN}/backend": enclave.backend,
        f"{DOMAIN}/encrypted-root": "true" if encrypted else "false",
    }


def _info(name: str, kind: bytes, mode: int, size: int = 0, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname = kind, mode, size, target
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


class _HashingReader:
    """A file read once: what tarfile copies is what gets hashed."""

    def __init__(self, fd: int):
        self.fd, self.hash, self.size = fd, hashlib.sha256(), 0

    def read(self, n: int = CHUNK) -> bytes:
        chunk = os.read(self.fd, min(n, CHUNK) if n and n > 0 else CHUNK)
        self.hash.update(chunk)
        self.size += len(chunk)
        return chunk


def _add_file(layer: tarfile.TarFile, path: Path, name: str, mode: int, size: int, digest: bytes | None) -> None:
    """Add one file; with a digest, the bytes written must be the signed ones."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        reader = _HashingReader(fd)
        try:
            layer.addfile(_info(name, tarfile.REGTYPE, mode, size), reader)
        except OSError:
            raise IntegrityError(
                f"image/{name} changed since the build (its size differs)", "rebuild with `cove build`"
            ) from None
        extra = os.read(fd, 1)
        if extra or (digest is not None and not hmac.compare_digest(reader.hash.digest(), digest)):
            raise IntegrityError(f"image/{name} changed since the build (content differs)", "rebuild with `cove build`")
    finally:
        os.close(fd)


def _add_folder(layer: tarfile.TarFile, folder: Path, arcroot: str) -> None:
    """A folder outside the signed listing (the encrypted volume), sorted, regular files only."""
    layer.addfile(_info(arcroot, tarfile.DIRTYPE, stat.S_IMODE(os.lstat(folder).st_mode)))
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            st = os.lstat(full)
            arcname = f"{arcroot}/{full.relative_to(folder)}"
            if stat.S_ISDIR(st.st_mode):
                layer.addfile(_info(arcname, tarfile.DIRTYPE, stat.S_IMODE(st.st_mode)))
            elif stat.S_ISREG(st.st_mode):
                _add_file(layer, full, arcname, stat.S_IMODE(st.st_mode), st.st_size, None)
            else:
                raise CoveError(f"{full}: only files and folders belong in an encrypted image")


def write_layer(instance: Instance, verified: VerifiedBuild, out: BinaryIO) -> None:
    """The root file system layer, as an uncompressed tar stream."""
    encrypted = encryption.find(instance.build_dir)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as layer:
        members: list[tuple[str, Entry | None]] = []
        if encrypted is None:  # the signed tree itself, from the signed listing
            members += [(e.path, e) for e in verified.entries]
        members.append((COVE_DIR, None))
        for name in sorted(members, key=lambda m: m[0]):
            path, entry = name
            if entry is None:
                _add_build(layer, instance, encrypted)
            elif entry.type == DIRECTORY:
                layer.addfile(_info(path, tarfile.DIRTYPE, entry.mode))
            elif entry.type == SYMLINK:
                layer.addfile(_info(path, tarfile.SYMTYPE, 0o777, target=entry.target))
            elif entry.type == FILE:
                _add_file(layer, instance.image / path, path, entry.mode, entry.size, entry.digest)


def _add_build(layer: tarfile.TarFile, instance: Instance, encrypted: EncryptedImage | None) -> None:
    layer.addfile(_info(COVE_DIR, tarfile.DIRTYPE, 0o755))
    files = [("cove.toml", instance.config_path)] + [(n, instance.build_dir / n) for n in BUILD_FILES]
    if encrypted is not None:
        files.append((encryption.IMAGE_KEY, instance.build_dir / encryption.IMAGE_KEY))
    for name, path in sorted(files):
        _add_file(layer, path, f"{COVE_DIR}/{name}", 0o644, os.stat(path).st_size, None)
    if encrypted is not None:
        _add_folder(layer, encrypted.volume, f"{COVE_DIR}/{encryption.ENCRYPTED_IMAGE}")


class _HashingWriter(io.RawIOBase):
    """Writes through to handle, hashing and counting what passes (the layer's digest and size)."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.hash, self.size = handle, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]  # tarfile writes bytes
        self.hash.update(data)
        self.size += len(data)
        return self.handle.write(data)


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _put_blob(blobs: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def image_config(verified: VerifiedBuild, layer_digest: str, labels: dict[str, str]) -> dict[str, Any]:
    """The OCI image configuration: what the engine passes on to the runtime by default."""
    config = verified.config
    user = config.process.user
    run: dict[str, Any] = {
        "Env": [f"{k}={v}" for k, v in sorted(config.env.default)],
        "WorkingDir": config.process.cwd,
        "User": "0:0" if user == "root" else user,
        "Labels": labels,
    }
    programs = [p for p in config.process.entry_points if not p.endswith("/")]
    if len(programs) == 1:
        run["Cmd"] = programs
    return {
        "created": EPOCH,
        "architecture": ARCHITECTURES.get(platform.machine(), platform.machine()),
        "os": "linux",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created": EPOCH, "created_by": "cove package --oci"}],
    }


def _write_layout(instance: Instance, verified: VerifiedBuild, folder: Path, tag: str) -> OciImage:
    blobs = folder / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    encrypted = encryption.find(instance.build_dir) is not None
    fd, tmp = tempfile.mkstemp(dir=blobs, prefix=".layer.")
    with os.fdopen(fd, "wb") as handle:
        writer = _HashingWriter(handle)
        write_layer(instance, verified, writer)  # type: ignore[arg-type]  # a RawIOBase that writes
    layer: dict[str, Any] = {
        "mediaType": LAYER_TYPE,
        "digest": f"sha256:{writer.hash.hexdigest()}",
        "size": writer.size,
    }
    os.chmod(tmp, 0o644)
    os.replace(tmp, blobs / writer.hash.hexdigest())
    notes = manifest_annotations(verified, encrypted)
    config: dict[str, Any] = dict(
        mediaType=CONFIG_TYPE, **_put_blob(blobs, _json(image_config(verified, layer["digest"], notes)))
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": config,
        "layers": [layer],
        "annotations": notes,
    }
    described: dict[str, Any] = dict(mediaType=MANIFEST_TYPE, **_put_blob(blobs, _json(manifest)))
    described["annotations"] = {
        "org.opencontainers.image.ref.name": tag.rpartition(":")[2],
        "io.containerd.image.name": _full_name(tag),
    }
    (folder / "oci-layout").write_bytes(_json({"imageLayoutVersion": "1.0.0"}))
    (folder / "index.json").write_bytes(_json({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": [described]}))
    # Docker's manifest.json beside the layout: what `podman load` reads as docker-archive
    (folder / "manifest.json").write_bytes(
        _json(
            [
                {
                    "Config": f"blobs/sha256/{config['digest'][7:]}",
                    "RepoTags": [_full_name(tag)],
                    "Layers": [f"blobs/sha256/{layer['digest'][7:]}"],
                }
            ]
        )
    )
    return OciImage(described["digest"], tag, notes)


def _full_name(tag: str) -> str:
    """NAME:TAG as engines store it (docker.io/library is not assumed: localhost/ like podman)."""
    name = tag
    first = name.split("/", 1)[0]
    if "/" not in name or not ("." in first or ":" in first or first == "localhost"):
        name = f"localhost/{name}"
    return name


def check_tag(tag: str) -> str:
    """NAME[:TAG] in the reference grammar's common form; TAG defaults to latest."""
    import re

    name, colon, version = tag.rpartition(":") if ":" in tag.rsplit("/", 1)[-1] else (tag, "", "latest")
    version = version or "latest"
    if not re.fullmatch(
        r"[a-z0-9]+([._-]+[a-z0-9]+)*(/[a-z0-9]+([._-]+[a-z0-9]+)*)*"
        r"|[a-zA-Z0-9.-]+(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)+",
        name,
    ) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", version):
        raise CoveError(f"--tag {tag!r} is not an image name", "use NAME:TAG, e.g. hello:1.0 (lower-case name)")
    return f"{name}:{version}"


def create(instance: Instance, out: Path, tag: str | None = None, allow_debug: bool = False) -> OciImage:
    """Write the OCI image to ``out`` (a folder, or a tarball when ``out`` ends in .tar)."""
    verified = artifacts.load_verified(instance.build_dir, instance.config_path)
    if verified.config.enclave.debug and not allow_debug:
        raise CoveError("refusing to package a debug enclave", "set debug = false and rebuild, or pass --debug-enclave")
    tag = check_tag(tag or f"{verified.config.enclave.name}:latest")
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        layout = work / "layout"
        image = _write_layout(instance, verified, layout, tag)
        if out.name.endswith(".tar"):
            tar = work / "image.tar"
            with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as archive:
                for path in sorted(layout.rglob("*"), key=lambda p: str(p.relative_to(layout))):
                    name = str(path.relative_to(layout))
                    if path.is_dir():
                        archive.addfile(_info(name, tarfile.DIRTYPE, 0o755))
                    else:
                        with open(path, "rb") as handle:
                            archive.addfile(_info(name, tarfile.REGTYPE, 0o644, path.stat().st_size), handle)
            os.chmod(tar, 0o644)
            os.replace(tar, out)
        else:
            if out.exists():
                if not (out / "oci-layout").is_file():
                    raise CoveError(f"{out} exists and is not an OCI image layout", "choose another -o PATH")
                os.rename(out, work / "old")
            os.chmod(layout, 0o755)
            os.rename(layout, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return image
