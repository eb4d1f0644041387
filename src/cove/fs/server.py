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

import ctypes
import os
import resource
import signal
import sys

import cbor2

from cove.errors import CoveError


def _die_with_parent() -> None:
    """SIGTERM when the process that started us goes away (so the volume is committed)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main() -> int:
    _die_with_parent()
    # load the heavy modules while the launcher is still preparing the enclave
    from cove.fs import fuse  # noqa: F401
    from cove.fs.access import Identity, open_volume

    try:
        settings = cbor2.loads(sys.stdin.buffer.read())
    except Exception:
        print("error: the server's settings are not readable", flush=True)
        return 2
    try:
        volume = open_volume(settings["volume"], settings["key"], Identity.from_cbor(settings.get("identity")),
                             label=settings["label"], writable=settings["writable"],
                             create=settings.get("create", False), anchor=settings.get("anchor", "auto"),
                             cache_bytes=settings.get("cache", 1 << 20), durable=settings.get("durable", True),
                             keks=settings.get("keks"))
    except CoveError as exc:
        print(f"error: {exc.line()}", flush=True)
        return 2
    except OSError as exc:
        print(f"error: cannot open the volume {settings['volume']}: {exc.strerror}", flush=True)
        return 2
    for problem in volume.problems:
        print(f"cove: secure fs {settings['label']}: {problem}", file=sys.stderr, flush=True)
    digests = None
    if settings.get("image") is not None:  # an encrypted root image: check it against the signed listing
        from cove.fs import encrypted_image

        listing = encrypted_image.decode_listing(cbor2.loads(settings["image"]))
        difference = encrypted_image.compare_listing(volume, listing)
        if difference:
            print(f"error: the encrypted image differs from the signed listing: {difference}", flush=True)
            volume.close()
            return 2
        encrypted_image.add_mount_points(volume, settings.get("extra_dirs", ()), settings.get("extra_files", ()))
        digests = {path: want[3] for path, want in listing.items() if want[0] == "f"}

    def ready() -> None:
        print("ready", flush=True)

    try:
        fuse.serve(volume, settings["mountpoint"], name=settings["label"],
                   commit_interval=settings.get("commit_interval", 1.0), on_ready=ready,
                   read_only=not settings["writable"], digests=digests, for_enclave=True)
    except RuntimeError as exc:  # pyfuse3 could not mount
        print(f"error: cannot mount {settings['label']}: {exc}", flush=True)
        volume.close()
        return 2
    try:
        volume.close()
    except CoveError as exc:
        print(f"cove: secure fs {settings['label']}: the last commit failed: {exc.line()}", file=sys.stderr,
              flush=True)
        return 1
    finally:
        if os.environ.get("COVE_FS_STATS"):  # diagnostics for bench/securefs.py
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(f"cove-fs-stats {settings['label']} peak_rss_kib={peak}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
