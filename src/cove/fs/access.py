"""Opening a volume the way a mount or a tool names it: a folder, a key source, an enclave.

This is where a key source meets a volume header: the header says which
source made the volume and at which svn it was sealed; the source must
match, and a sealing key is derived at that svn (an enclave of a lower svn
cannot). A writable open by an enclave of a higher svn re-wraps the volume
key at its own svn, so older enclaves lose access from then on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cove.errors import CoveError

from cove.fs import anchor as anchor_mod
from cove.fs import keys
from cove.fs.index import KeyPolicy
from cove.fs.errors import VolumeError
from cove.fs.volume import DEFAULT_FILE_CACHE, Volume
from cove.fs.volume_format import NEXT, ROOT, split_root

if TYPE_CHECKING:
    from cove.platform.sealing import Identity as SealingIdentity


@dataclass(frozen=True)
class Identity:
    """The enclave identity sealing keys derive from (see cove.runtime.backend.EnclaveIdentity)."""

    measurement: bytes
    signer: bytes
    product_id: int
    svn: int
    debug: bool

    @classmethod
    def of(cls, other: SealingIdentity) -> Identity:
        return cls(bytes(other.measurement), bytes(other.signer), other.product_id, other.svn, other.debug)

    def to_cbor(self) -> dict[str, Any]:
        return {
            "measurement": self.measurement,
            "signer": self.signer,
            "product_id": self.product_id,
            "svn": self.svn,
            "debug": self.debug,
        }


def is_empty_folder(path: str) -> bool:
    return not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path))


def header_policies(path: str) -> list[KeyPolicy]:
    """The key policies the (plaintext) headers of a volume's root files name; no key needed."""
    found = []
    for name in (ROOT, NEXT):
        try:
            header = split_root(Path(path, name).read_bytes())[0]
            found.append(KeyPolicy(header["key"]["source"], header["key"]["svn"]))
        except (OSError, CoveError, KeyError, TypeError):
            continue
    return found


def resolve_keks(path: str, key_text: str, identity: Identity | None) -> dict[int, bytes]:
    """The keys (by svn) that opening the volume at ``path`` needs, resolved here.

    Lets a process that can reach the key (e.g. ``cove run``, which holds
    what the key broker released) hand it to another (the FUSE server).
    """
    source = keys.parse(key_text)
    if not source.sealed:
        return {0: keys.resolve(source, identity)}
    svns = {identity.svn if identity is not None else 0}
    svns |= {p.svn for p in header_policies(path) if p.svn <= max(svns)}
    return {svn: keys.resolve(source, identity, svn) for svn in sorted(svns)}


def open_volume(
    path: str,
    key_text: str,
    identity: Identity | None = None,
    *,
    label: str | None = None,
    writable: bool = True,
    create: bool = False,
    anchor: str = "auto",
    cache_bytes: int = DEFAULT_FILE_CACHE,
    durable: bool = True,
    check_anchor: bool = True,
    keks: dict[int, bytes] | None = None,
) -> Volume:
    """Open (or, with ``create``, make) the volume at ``path`` with the key ``key_text`` names.

    ``keks`` (from :func:`resolve_keks`) supplies the keys instead of resolving them here.
    """
    path = os.path.abspath(path)
    source = keys.parse(key_text)
    svn = identity.svn if identity is not None and source.sealed else 0
    wanted = KeyPolicy.of(key_text, svn)

    def resolve(at: int | None) -> bytes:
        if keks is not None:
            found = keks.get(at or 0)
            if found is None:
                raise keys.KeySourceError(
                    f"data sealed at svn {at} cannot be unsealed by an enclave with svn {svn}",
                    "a lower svn never reads what a higher svn sealed",
                )
            return found
        return keys.resolve(source, identity, at)

    if create and is_empty_folder(path):
        if not writable:
            raise VolumeError(
                f"{path} holds no volume yet, and the mount is read-only",
                "make the mount writable once, or create the volume with `cove fs encrypt`",
            )
        known = anchor_mod.known_volume_at(path)
        if known is not None:
            raise VolumeError(
                f"the volume at {path} was deleted: this platform holds its rollback "
                f"anchor at version {known.get('current')}",
                f"restore the volume, or run `cove fs forget {path}` to start an empty one",
            )
        kek = resolve(svn if source.sealed else None)
        return Volume.create(
            path, kek, label=label or "/", policy=wanted, anchor=anchor, cache_bytes=cache_bytes, durable=durable
        )

    def key_for(policy: KeyPolicy) -> bytes:
        if policy.source != wanted.source:
            raise VolumeError(
                f"this volume's key comes from {policy.source}, not {wanted.source}",
                "use the key source the volume was made with",
            )
        return resolve(policy.svn if source.sealed else None)

    volume = Volume.open(
        path,
        key_for,
        label=label,
        writable=writable,
        cache_bytes=cache_bytes,
        durable=durable,
        check_anchor=check_anchor,
    )
    try:
        if anchor not in ("auto", volume.store.kind):
            raise VolumeError(
                f"this volume's rollback anchor is {volume.store.kind!r}, the mount asks for {anchor!r}",
                'an anchor is chosen when a volume is made; use rollback = "auto"',
            )
        if writable and source.sealed and svn > volume.policy.svn:
            volume.rewrap(resolve(svn), wanted)
            volume.commit()
    except BaseException:
        volume.close()
        raise
    return volume
