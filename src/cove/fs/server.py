"""The FUSE server process of an encrypted mount: ``python -m cove.fs.server``.

It runs outside the sandbox, as the user who runs ``cove run``. Its settings
(volume folder, mount point, key source, enclave identity) arrive as one CBOR
map on stdin, never on the command line or in the environment; it derives
the key itself, opens (or creates) the volume, mounts it, writes ``ready``
on stdout and serves until the mount is unmounted or it gets SIGTERM, then
commits and exits. Any error before ``ready`` is one line ``error: ...`` on
stdout and exit status 2.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cove import util
from cove.decode import Fields, decode_cbor
from cove.errors import CoveError

if TYPE_CHECKING:
    from cove.fs.access import Identity

MAX_SETTINGS = 1 << 28  # the settings of an encrypted image carry its signed listing (see encrypted_image)
_KEYS = (
    "volume",
    "key",
    "identity",
    "keks",
    "label",
    "writable",
    "create",
    "anchor",
    "cache",
    "durable",
    "image",
    "extra_dirs",
    "extra_files",
    "mountpoint",
    "commit_interval",
)


@dataclass(frozen=True)
class Settings:
    """What arrives on stdin, each field checked (cove.fs.server_process and its callers write it)."""

    volume: str
    key: str
    identity: Identity | None
    keks: dict[int, bytes] | None
    label: str
    writable: bool
    create: bool
    anchor: str
    cache: int
    durable: bool
    image: bytes | None
    extra_dirs: tuple[str, ...]
    extra_files: tuple[str, ...]
    mountpoint: str
    commit_interval: float


def read_settings(data: bytes) -> Settings:
    """The server's settings from their CBOR map; anything else is a CoveError naming the field."""
    f = Fields(
        decode_cbor(data, CoveError, "the server's settings", limit=MAX_SETTINGS),
        "the server's settings",
        CoveError,
        _KEYS,
    )
    from cove.fs.access import Identity

    ident = f.sub("identity", ("measurement", "signer", "product_id", "svn", "debug"), optional=True)
    identity = (
        None
        if ident is None
        else Identity(
            ident.bytes("measurement"),
            ident.bytes("signer"),
            ident.uint("product_id"),
            ident.uint("svn"),
            ident.boolean("debug"),
        )
    )
    keks = f.value("keks", dict, None)
    if keks is not None:
        assert isinstance(keks, dict)
        if not all(isinstance(k, int) and not isinstance(k, bool) and isinstance(v, bytes) for k, v in keks.items()):
            raise f.fail("keks", "must map key versions to byte strings")
    interval = f.value("commit_interval", (int, float), 1.0)
    assert isinstance(interval, (int, float))
    if not 0 < interval <= 3600:
        raise f.fail("commit_interval", "must be from 0 to 3600 seconds")
    return Settings(
        volume=f.text("volume", max_len=4096),
        key=f.text("key", max_len=4096),
        identity=identity,
        keks=keks,
        label=f.text("label", max_len=4096),
        writable=f.boolean("writable"),
        create=f.boolean("create", False),
        anchor=f.text("anchor", default="auto"),
        cache=f.integer("cache", default=1 << 20),
        durable=f.boolean("durable", True),
        image=f.bytes("image", max_size=MAX_SETTINGS, optional=True),
        extra_dirs=_texts(f, "extra_dirs"),
        extra_files=_texts(f, "extra_files"),
        mountpoint=f.text("mountpoint", max_len=4096),
        commit_interval=float(interval),
    )


def _texts(f: Fields, key: str) -> tuple[str, ...]:
    items = f.list(key, max_items=1 << 16, default=())
    if not all(isinstance(item, str) for item in items):
        raise f.fail(key, "must be a list of text strings")
    return tuple(str(item) for item in items)


def main() -> int:
    util.die_with_parent(signal.SIGTERM)  # so the volume is committed when the launcher goes away
    # load the heavy modules while the launcher is still preparing the enclave
    from cove.fs import encrypted_image, fuse  # noqa: F401
    from cove.fs.access import open_volume

    try:
        settings = read_settings(sys.stdin.buffer.read(MAX_SETTINGS + 1))
        # an encrypted root image: checked below against its signed listing
        listing = encrypted_image.decode_listing(settings.image) if settings.image is not None else None
    except CoveError as exc:
        print(f"error: {exc.line()}", flush=True)
        return 2
    try:
        volume = open_volume(
            settings.volume,
            settings.key,
            settings.identity,
            label=settings.label,
            writable=settings.writable,
            create=settings.create,
            anchor=settings.anchor,
            cache_bytes=settings.cache,
            durable=settings.durable,
            keks=settings.keks,
        )
    except CoveError as exc:
        print(f"error: {exc.line()}", flush=True)
        return 2
    except OSError as exc:
        print(f"error: cannot open the volume {settings.volume}: {exc.strerror}", flush=True)
        return 2
    for problem in volume.problems:
        print(f"cove: secure fs {settings.label}: {problem}", file=sys.stderr, flush=True)
    digests = None
    if listing is not None:
        difference = encrypted_image.compare_listing(volume, listing)
        if difference:
            print(f"error: the encrypted image differs from the signed listing: {difference}", flush=True)
            volume.close()
            return 2
        encrypted_image.add_mount_points(volume, settings.extra_dirs, settings.extra_files)
        digests = {path: want[3] for path, want in listing.items() if want[0] == "f"}

    def ready() -> None:
        print("ready", flush=True)

    try:
        fuse.serve(
            volume,
            settings.mountpoint,
            name=settings.label,
            commit_interval=settings.commit_interval,
            on_ready=ready,
            read_only=not settings.writable,
            digests=digests,
            for_enclave=True,
        )
    except RuntimeError as exc:  # pyfuse3 could not mount
        print(f"error: cannot mount {settings.label}: {exc}", flush=True)
        volume.close()
        return 2
    try:
        volume.close()
    except CoveError as exc:
        print(f"cove: secure fs {settings.label}: the last commit failed: {exc.line()}", file=sys.stderr, flush=True)
        return 1
    finally:
        if os.environ.get("COVE_FS_STATS"):  # diagnostics for bench/securefs.py
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(f"cove-fs-stats {settings.label} peak_rss_kib={peak}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
