"""An encrypted root image: code confidential at rest, decrypted only for the running enclave.

``cove build --encrypt-image SOURCE`` measures the plain image as usual
(the measurement is over the plain listing and contents) and then
:func:`encrypt_image` writes it into a read-only volume, checking each
file's SHA-256 against the listing it just measured. The plain ``image/``
folder need not ship.

At ``cove run``, :class:`ImageMount` serves that volume as the enclave's
root through a FUSE server outside the sandbox: a read-only, verifying,
decrypting view. Before mounting, its listing (paths, types, modes, sizes,
symlink targets) must equal the signed one; each file's content is hashed
on its first open and compared with the signed digest, and a file that
differs answers EIO. Plain bytes exist only in the server's memory and the
kernel's page cache, never in a file. :func:`decrypt_image` is the fallback
for a backend that needs the root as files: a verified plain copy into a
private folder.

The image volume has no rollback anchor: the signed measurement already pins
every byte, so an older image fails the digest checks.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import cbor2

from cove.decode import Fields, decode_cbor
from cove.errors import IntegrityError
from cove.fs import keys
from cove.fs.access import Identity, open_volume
from cove.fs.index import KeyPolicy, Node
from cove.fs.volume import Volume

if TYPE_CHECKING:
    from cove.fs.server_process import FuseServer
    from cove.platform.sealing import Identity as SealingIdentity

LABEL = "/"
CHUNK = 1 << 20

# One listed path: (type, mode, size (files only), digest, symlink target).
Listed = tuple[str, int, int, bytes, str]


class ImageEntry(Protocol):
    """What this module needs of a signed image entry (cove.image.tree.Entry, a layer above)."""

    @property
    def path(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def mode(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def digest(self) -> bytes: ...
    @property
    def target(self) -> str: ...
    def encode(self) -> list[Any]: ...


def listing_of(entries: Iterable[ImageEntry]) -> dict[str, Listed]:
    """path -> (type, mode, size, digest, target) from signed image entries (cove.image.tree.Entry)."""
    return {e.path: (e.type, e.mode, e.size if e.type == "f" else 0, bytes(e.digest), e.target) for e in entries}


def decode_listing(data: bytes) -> dict[str, Listed]:
    """The listing of :func:`listing_of` from its CBOR encoding, entries [path, type, mode, size, digest, target].

    The encoding is cove.image.tree.Entry.encode's; the secure FS server gets the
    signed listing this way and so needs nothing from the image layer above it.
    Anything else (trailing bytes, a wrong shape or type) is an IntegrityError.
    """
    items = decode_cbor(data, _malformed, "image listing", limit=LISTING_LIMIT)
    if not isinstance(items, list):
        raise _malformed("image listing must be a list")
    listing: dict[str, Listed] = {}
    for i, item in enumerate(items):
        if not isinstance(item, list) or len(item) != 6:
            raise _malformed(f"image listing entry {i} must be a list of six items")
        f = Fields(dict(zip(_ENTRY_FIELDS, item)), f"image listing entry {i}", _malformed)
        kind = f.text("type", ("f", "d", "l"))
        listing[f.text("path", max_len=_NAME_MAX)] = (
            kind,
            f.integer("mode", 0, 0o7777),
            f.uint("size") if kind == "f" else 0,
            f.bytes("digest"),
            f.text("target", max_len=_NAME_MAX),
        )
    return listing


_ENTRY_FIELDS = ("path", "type", "mode", "size", "digest", "target")
_NAME_MAX = 1 << 16  # as cove.image.tree: a path or link target, far beyond what the kernel allows
LISTING_LIMIT = 1 << 28  # as cove.image.tree: 256 MiB is millions of paths


def _malformed(message: str) -> IntegrityError:
    return IntegrityError(message, "rebuild the image with `cove build`")


def encrypt_image(
    image_dir: Path,
    out_dir: Path,
    key_text: str,
    identity: SealingIdentity | None,
    entries: Iterable[ImageEntry],
    key_bytes: bytes | None = None,
) -> tuple[int, int]:
    """Encrypt the measured ``image_dir`` into the read-only volume ``out_dir`` (replaced); (files, bytes).

    ``entries`` is the listing just measured; a file that changed since
    (its digest differs) stops the build. Owners become root, as in a staged root.
    ``key_bytes`` stands in for a source only the running enclave can resolve
    (``kbs:``: the key the broker will release).
    """
    from cove.fs.transfer import new_volume_from

    listing = listing_of(entries)
    source = keys.parse(key_text)
    ident = Identity.of(identity) if identity is not None else None
    kek = keys.resolve(source, ident) if key_bytes is None else bytes(key_bytes)
    if len(kek) != keys.KEY_SIZE:
        raise keys.KeySourceError(f"an image key holds {keys.KEY_SIZE} bytes, not {len(kek)}")
    policy = KeyPolicy.of(key_text, ident.svn if ident is not None and source.sealed else 0)

    def check(rel: str, digest: bytes) -> None:
        want = listing.get(rel.lstrip("/"))
        if want is None or not hmac.compare_digest(want[3], digest):
            raise IntegrityError(f"image file {rel} changed while the image was being encrypted", "build again")

    files, size, _ = new_volume_from(
        Path(image_dir),
        Path(out_dir),
        kek,
        label=LABEL,
        policy=policy,
        anchor="none",
        force=True,
        check=check,
        owner=(0, 0),
    )
    keks = {0: kek} if key_bytes is not None else None
    with open_volume(str(out_dir), key_text, ident, label=LABEL, writable=False, anchor="none", keks=keks) as volume:
        difference = compare_listing(volume, listing)
    if difference:
        raise IntegrityError(f"the encrypted image differs from the measured one: {difference}", "build again")
    return files, size


def compare_listing(volume: Volume, listing: dict[str, Listed]) -> str | None:
    """The first difference between a volume's tree and a signed listing, or None."""
    seen = set()
    for path, node in volume.walk():
        rel = path.lstrip("/")
        seen.add(rel)
        want = listing.get(rel)
        kind = {"d": "d", "f": "f", "l": "l"}[node.kind]
        have = (
            kind,
            stat.S_IMODE(node.mode),
            node.size if kind == "f" else 0,
            os.fsdecode(node.target) if kind == "l" and node.target is not None else "",
        )
        if want is None:
            return f"{rel} is not in the signed listing"
        if (want[0], want[1], want[2], want[4]) != have:
            return f"{rel} differs (type, mode, size or target)"
    missing = sorted(set(listing) - seen)
    if missing:
        return f"{missing[0]} is missing"
    return None


def add_mount_points(volume: Volume, targets: Iterable[str], files: Iterable[str] = ()) -> None:
    """Mount points (in memory only) the sandbox needs: folders for /proc, /dev, /tmp and the
    mounts, empty files for binds of single files. They hold nothing; a bind covers each."""
    files = list(files)
    for target in list(targets) + files:
        node = volume.root
        parts = [p for p in target.strip("/").split("/") if p]
        for index, part in enumerate(parts):
            child = node.entries.get(part.encode()) if node.kind == "d" else None
            if child is None:
                leaf_file = target in files and index == len(parts) - 1
                child = Node("f" if leaf_file else "d", (stat.S_IFREG | 0o444) if leaf_file else (stat.S_IFDIR | 0o755))
                child.parent, child.name = node, part.encode()
                node.entries[part.encode()] = child
                volume.assign_inode(child)
            node = child


def decrypt_image(
    enc_dir: Path, key_text: str, identity: SealingIdentity | None, entries: Iterable[ImageEntry], dest: Path
) -> Path:
    """A verified plain copy of an encrypted image in the new folder ``dest`` (owner-only until done)."""
    from cove.fs.transfer import export_tree

    listing = listing_of(entries)
    ident = Identity.of(identity) if identity is not None else None
    with open_volume(str(enc_dir), key_text, ident, label=LABEL, writable=False, anchor="none") as volume:
        difference = compare_listing(volume, listing)
        if difference:
            raise IntegrityError(f"the encrypted image differs from the signed listing: {difference}")
        export_tree(volume, dest)
    for rel, want in listing.items():
        if want[0] == "f":
            digest = hashlib.sha256()
            with open(dest / rel, "rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
            if not hmac.compare_digest(digest.digest(), want[3]):
                raise IntegrityError(f"image file {rel} differs from the signed listing")
    return dest


def image_settings(
    enc_dir: Path,
    key_text: str,
    identity: SealingIdentity | None,
    entries: Iterable[ImageEntry],
    extra_dirs: Iterable[str],
    extra_files: Iterable[str] = (),
) -> dict[str, Any]:
    """What the FUSE server needs to serve an encrypted image (see cove.fs.server)."""
    from cove.fs.access import resolve_keks

    ident = Identity.of(identity) if identity is not None else None
    return {
        "volume": str(enc_dir),
        "label": LABEL,
        "key": key_text,
        "identity": ident.to_cbor() if ident else None,
        "keks": resolve_keks(str(enc_dir), key_text, ident),
        "writable": False,
        "create": False,
        "anchor": "none",
        "image": cbor2.dumps([e.encode() for e in entries]),
        "extra_dirs": list(extra_dirs),
        "extra_files": list(extra_files),
    }


class ImageMount:
    """The enclave's root served from an encrypted image (see the module's docstring).

    ``start()`` returns the mount point to use as the root; ``stop()`` unmounts.
    ``extra_dirs`` are the folder mount points the sandbox needs (proc, dev, tmp,
    mount targets, service binds of folders), ``extra_files`` the file mount
    points (service binds of single files); the image is read-only, so they
    must be named before it is mounted. ``spawn()`` starts the server process
    early, so that its start-up overlaps other work; the key is only resolved
    in ``start()`` (a ``kbs:`` key exists once the enclave has attested).
    """

    def __init__(
        self,
        enc_dir: Path,
        key_text: str,
        identity: SealingIdentity | None,
        entries: Iterable[ImageEntry],
        mountpoint: Path,
        extra_dirs: Iterable[str] = (),
        extra_files: Iterable[str] = (),
    ) -> None:
        self.volume, self.key_text, self.identity, self.entries = Path(enc_dir), key_text, identity, entries
        self.extra_dirs, self.extra_files = list(extra_dirs), list(extra_files)
        self.mountpoint = Path(mountpoint)
        self.server: FuseServer | None = None

    def spawn(self) -> FuseServer:
        """Start the server process now (once); the key is resolved later, in start()."""
        from cove.fs.server_process import FuseServer

        if self.server is None:
            self.server = FuseServer("encrypted image")
            self.server.spawn()
        return self.server

    def start(self, extra_dirs: Iterable[str] | None = None, extra_files: Iterable[str] | None = None) -> Path:
        if extra_dirs is not None:
            self.extra_dirs = list(extra_dirs)
        if extra_files is not None:
            self.extra_files = list(extra_files)
        settings = image_settings(
            self.volume, self.key_text, self.identity, self.entries, self.extra_dirs, self.extra_files
        )
        self.mountpoint.mkdir(mode=0o700, exist_ok=True)
        self.spawn().start(settings, self.mountpoint)
        return self.mountpoint

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def __enter__(self) -> Path:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
