"""The enclave manifest: what `cove build` measures and signs.

The manifest is one canonical CBOR map (RFC 8949 core deterministic
encoding) holding the security-relevant configuration and the image's root
hash. Its SHA-256 is the enclave's measurement. The format is written down in
``docs/formats/manifest.md``; change it only with a new ``format`` value.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cbor2

from cove.decode import Fields, decode_cbor
from cove.errors import IntegrityError
from cove.image.tree import Entry, FILE, root_hash

FORMAT = "cove-manifest/1"


@dataclass(frozen=True)
class Manifest:
    """A decoded manifest together with the exact bytes that were measured."""

    config: dict
    image_root: bytes
    image_files: int
    image_bytes: int
    encoded: bytes
    launch: dict | None = None  # backend "vm": {"type": "vm", "measurement": launch measurement}

    @property
    def measurement(self) -> bytes:
        return hashlib.sha256(self.encoded).digest()

    @property
    def enclave(self) -> dict:
        return self.config["enclave"]


def make(measured_config: dict, entries: list[Entry], launch: dict | None = None) -> Manifest:
    """Build the manifest for a configuration and an image listing (and a vm's launch measurement)."""
    files = [e for e in entries if e.type == FILE]
    body = {
        "format": FORMAT,
        "config": measured_config,
        "image": {
            "root": root_hash(entries),
            "files": len(files),
            "bytes": sum(e.size for e in files),
        },
    }
    if launch is not None:  # only for vm builds: sim manifests keep their bytes
        body["launch"] = launch
    return decode(cbor2.dumps(body, canonical=True))


def decode(data: bytes) -> Manifest:
    """Parse manifest bytes; anything malformed is an integrity failure."""
    body = Fields(
        decode_cbor(data, _malformed, "manifest"), "manifest", _malformed, ("format", "config", "image", "launch")
    )
    found = body.value("format", object)
    if found != FORMAT:
        raise _malformed(f"manifest format {found!r} is not {FORMAT}")
    image = body.sub("image", ("root", "files", "bytes"))
    config = body.sub("config")
    config.sub("enclave").text("name")  # the enclave section and its name must be present
    manifest = Manifest(
        config=dict(config.map),
        image_root=image.bytes("root", 32),
        image_files=image.uint("files"),
        image_bytes=image.uint("bytes"),
        encoded=bytes(data),
        launch=_launch(body.sub("launch", ("type", "measurement"), optional=True)),
    )
    if cbor2.dumps(body.map, canonical=True) != data:
        raise _malformed("manifest is not in canonical encoding")
    return manifest


def _malformed(message: str) -> IntegrityError:
    return IntegrityError(message, "rebuild with `cove build`")


def _launch(launch: Fields | None) -> dict | None:
    if launch is None:
        return None
    launch.text("type", ("vm",))
    return {"type": "vm", "measurement": launch.bytes("measurement", 32)}


def config_difference(signed: dict, current: dict, prefix: str = "") -> str | None:
    """Name the first key whose value differs between two measured configurations."""
    for key in sorted(set(signed) | set(current)):
        name = f"{prefix}{key}"
        old, new = signed.get(key), current.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            return config_difference(old, new, name + ".")
        return name
    return None
