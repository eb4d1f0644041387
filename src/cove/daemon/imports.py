"""Which stored image an instance's build has already been imported as, remembered by the daemon.

Every `cove run` through the daemon names an instance folder; importing it
again (copy the build files, check the signature and the configuration) only
to find the image already stored costs more than starting the enclave. So
the daemon remembers, per instance folder, the identity of the files that
import read (device, inode, size, mode, owner, modification and change times
of ``build/manifest.cbor``, its signature, its listing, ``cove.toml``, and
whether ``build/image.enc`` exists) together with the signer asked for, and
the stored image they imported as. While none of those changes, the same
verified stored image runs; any change (an edit, a rebuild, a rename over a
file: the change time is set by the kernel, not by the file's owner) imports
again. docs/threat-model.md says why this is safe.
"""

from __future__ import annotations

import os
import threading

from collections import OrderedDict
from pathlib import Path

from cove.image.artifacts import VerifiedBuild
from cove.image.encryption import ENCRYPTED_IMAGE  # such a build is refused, never cached
from cove.image.store import BUILD_FILES, ImageStore, StoredImage

LIMIT = 1024  # instance folders remembered (the oldest is forgotten first)

Key = tuple[object, ...]


def _identity(path: Path) -> tuple[int, ...] | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mode, st.st_uid, st.st_mtime_ns, st.st_ctime_ns)


def key(instance: Path, signer: bytes | None, reader: int | None) -> Key | None:
    """What an import of ``instance`` depends on; None when a file it needs is missing (import reports it)."""
    files = [instance / "build" / name for name in BUILD_FILES] + [instance / "cove.toml"]
    found = [_identity(path) for path in files]
    if any(identity is None for identity in found):
        return None
    encrypted = _identity(instance / "build" / ENCRYPTED_IMAGE) is not None
    return (str(instance), signer, reader, encrypted, *found)


class ImportCache:
    """ImageStore.import_instance and ImageStore.verified, remembered while the build files are unchanged.

    Shared by the daemon's request threads: every look at or change of its two maps holds ``lock``.
    """

    def __init__(self, store: ImageStore, limit: int = LIMIT) -> None:
        self.store = store
        self.limit = limit
        self.images: OrderedDict[Key, str] = OrderedDict()
        self.builds: dict[str, VerifiedBuild] = {}
        self.lock = threading.Lock()  # the daemon's request threads share the cache

    def import_instance(
        self, instance: Path, signer: bytes | None = None, reader: int | None = None
    ) -> tuple[StoredImage, bool]:
        before = key(instance, signer, reader)
        with self.lock:
            ident = self.images.get(before) if before is not None else None
        if before is not None and ident is not None:
            image = self._stored(ident)
            with self.lock:
                if image is not None:
                    if before in self.images:
                        self.images.move_to_end(before)
                    return image, False
                self.images.pop(before, None)  # another request may have dropped it already
        image, new = self.store.import_instance(instance, signer, reader)  # the store has its own locking
        if before is not None and key(instance, signer, reader) == before:  # nothing changed during the import
            with self.lock:
                self.images[before] = image.id
                while len(self.images) > self.limit:
                    self.images.popitem(last=False)
        return image, new

    def verified(self, image: StoredImage) -> VerifiedBuild:
        """The stored build, checked once per image (the store is root's alone: it does not change)."""
        with self.lock:
            build = self.builds.get(image.id)
        if build is None:
            build = self.store.verified(image)  # outside the lock: two first runs may both check, once each
            with self.lock:
                self.builds[image.id] = build
        return build

    def forget(self, ident: str) -> None:
        """An image left the store (rmi)."""
        with self.lock:
            self.builds.pop(ident, None)
            for cached, value in list(self.images.items()):
                if value == ident:
                    del self.images[cached]

    def _stored(self, ident: str) -> StoredImage | None:
        if not (self.store.images / ident).is_dir():
            with self.lock:
                self.builds.pop(ident, None)
            return None
        return self.store.get(ident)
