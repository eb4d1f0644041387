"""Loading what `cove build` wrote, verified: signature, listing, configuration.

Everything here distrusts the files it reads. The manifest must carry a valid
signature (and, if the caller pins one, the expected signer); the image
listing must hash to the root the manifest records; the current cove.toml
must measure to the same configuration.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

from cove import config as cove_config
from cove.errors import IntegrityError
from cove.image import manifest as manifest_mod
from cove.image import signing
from cove.image.tree import Entry, decode_entries, root_hash

MANIFEST = "manifest.cbor"
SIGNATURE = "manifest.sig"
TREE = "image.tree"


@dataclass(frozen=True)
class VerifiedBuild:
    """A manifest whose signature, listing and configuration have been checked."""

    manifest: manifest_mod.Manifest
    signature: signing.Signature
    entries: list[Entry]
    config: cove_config.Config

    @property
    def measurement(self) -> bytes:
        return self.manifest.measurement

    @property
    def signer(self) -> bytes:
        return self.signature.signer


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(
            f"{path.name} is missing from {path.parent}", "build the enclave with `cove build`"
        ) from None


def load_manifest(build_dir: Path) -> tuple[manifest_mod.Manifest, signing.Signature]:
    """The signed manifest of a build folder, signature checked."""
    data = _read(build_dir / MANIFEST)
    signature = signing.Signature.decode(_read(build_dir / SIGNATURE))
    signing.verify(signature, data)
    return manifest_mod.decode(data), signature


def load_verified(build_dir: Path, config_path: Path, expected_signer: bytes | None = None) -> VerifiedBuild:
    """Check signature, signer, listing and configuration; raise IntegrityError on any mismatch."""
    manifest, signature = load_manifest(build_dir)
    if expected_signer is not None and not hmac.compare_digest(signature.signer, expected_signer):
        raise IntegrityError(
            f"manifest is signed by {signature.signer.hex()}, not the expected signer {expected_signer.hex()}"
        )
    entries = decode_entries(_read(build_dir / TREE))
    if not hmac.compare_digest(root_hash(entries), manifest.image_root):
        raise IntegrityError(f"{TREE} does not match the signed manifest", "rebuild with `cove build`")
    config = cove_config.load(config_path)
    changed = manifest_mod.config_difference(manifest.config, cove_config.to_measured(config))
    if changed:
        raise IntegrityError(
            f"cove.toml changed since the build: {changed}",
            "rebuild with `cove build` to measure the new configuration",
        )
    return VerifiedBuild(manifest, signature, entries, config)
