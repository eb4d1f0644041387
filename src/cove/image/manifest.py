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
    try:
        body = cbor2.loads(data)
        if body.get("format") != FORMAT:
            raise ValueError(f"format {body.get('format')!r} is not {FORMAT}")
        image = body["image"]
        manifest = Manifest(config=body["config"], image_root=bytes(image["root"]),
                            image_files=int(image["files"]), image_bytes=int(image["bytes"]),
                            encoded=bytes(data), launch=_launch(body.get("launch")))
        if cbor2.dumps(body, canonical=True) != data:
            raise ValueError("not in canonical encoding")
        manifest.enclave["name"]  # noqa: B018 - the enclave section must be present
    except IntegrityError:
        raise
    except Exception as exc:
        raise IntegrityError(f"manifest is malformed: {exc}", "rebuild with `cove build`") from None
    return manifest


def _launch(launch) -> dict | None:
    if launch is None:
        return None
    if not isinstance(launch, dict) or launch.get("type") != "vm" or len(bytes(launch["measurement"])) != 32:
        raise ValueError("launch section is not a vm launch measurement")
    return {"type": "vm", "measurement": bytes(launch["measurement"])}


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
