"""`cove build --encrypt-image SOURCE`: the build's encrypted copy of the root image.

The measurement stays over the plain image (a verifier sees the same
measurement whether or not the code is encrypted at rest); the encrypted
copy goes to build/image.enc and the key source that opens it to
build/image.key. That file is a recipe, not a secret (``seal:mrsigner``,
``file:PATH``, ``kbs:RESOURCE``), and it is not measured: a host that edits
it or swaps image.enc for another volume gains nothing, because the run
refuses any key source other than the one the volume was sealed with, and
serves each file only if it matches the signed digest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cove.config import Config
from cove.errors import ConfigError, CoveError
from cove.util import write_atomic

ENCRYPTED_IMAGE = "image.enc"
IMAGE_KEY = "image.key"


@dataclass(frozen=True)
class EncryptedImage:
    """Where a build's encrypted root lives and which key source opens it."""

    volume: Path
    key: str


def check_source(key_text: str, config: Config) -> str:
    """The normalized key source, or a clear refusal before anything is hashed or written."""
    from cove.fs import keys

    source = keys.parse(key_text)
    if source.kind == "insecure" and not config.enclave.debug:
        raise ConfigError(
            f"--encrypt-image {source.kind}: is for debug enclaves only",
            "use seal:mrsigner, seal:mrenclave, file:PATH or kbs:RESOURCE",
        )
    if source.kind == "kbs" and config.attestation is None:
        raise ConfigError(
            f"--encrypt-image {source.text} needs the key broker at run time",
            'add [attestation] with kbs = "https://..." to cove.toml',
        )
    return source.text


def find(build_dir: Path) -> EncryptedImage | None:
    """The build's encrypted image, if it was built with --encrypt-image."""
    volume, key_file = build_dir / ENCRYPTED_IMAGE, build_dir / IMAGE_KEY
    if not volume.is_dir():
        return None
    try:
        key = key_file.read_text().strip()
    except OSError:
        raise CoveError(
            f"{ENCRYPTED_IMAGE} is in {build_dir.name}/ but {IMAGE_KEY} is not",
            "build again with `cove build --encrypt-image SOURCE`",
        ) from None
    return EncryptedImage(volume, key)


def remove(build_dir: Path) -> None:
    """Drop a previous build's encrypted image (it no longer matches the manifest)."""
    import shutil  # here: only a build removes one; the launch path imports this module

    (build_dir / IMAGE_KEY).unlink(missing_ok=True)
    shutil.rmtree(build_dir / ENCRYPTED_IMAGE, ignore_errors=True)


def write(
    image: Path, build_dir: Path, key_text: str, identity, entries, key_bytes: bytes | None = None
) -> tuple[int, int]:
    """Encrypt ``image`` (just measured as ``entries``) into build/image.enc; (files, bytes).

    ``key_bytes`` is the key itself when the run-time source (``kbs:``) cannot
    be resolved at build time.
    """
    from cove.fs.encrypted_image import encrypt_image

    remove(build_dir)
    try:
        counted = encrypt_image(image, build_dir / ENCRYPTED_IMAGE, key_text, identity, entries, key_bytes)
        write_atomic(build_dir / IMAGE_KEY, (key_text + "\n").encode(), mode=0o644)
    except BaseException:
        remove(build_dir)
        raise
    return counted
