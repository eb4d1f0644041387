"""The process serving one enclave's /dev/attestation (``python -m cove.platform.devattest_server MOUNTPOINT``).

It runs beside the enclave, outside it, as a child of ``cove run``: it reads
the enclave's identity (JSON on stdin, written by the runtime from the
verified manifest), loads the platform key, mounts the file system, prints
``ready`` (or ``ready none: REASON`` when it can only say
attestation_type=none) and serves until SIGTERM. Started early, before the
runtime knows the enclave, it loads the key while the runtime verifies the
build and mounts as soon as it is told where; if the key is still loading
then, it prints ``mounted`` first, so the runtime goes on meanwhile (the
sandbox's bind of the mount, like any request to it, waits in the kernel
until the loop answers), and ``ready`` (or ``ready none: REASON``) follows;
if the key then fails, the mount is left dead (ENOTCONN), so the bind fails
and the run is refused. A process of its own keeps
the enclave's quotes off the launcher's own loop. It speaks FUSE itself
(cove.platform.devattest.serve), so its start is the interpreter's, the
platform key's and ``cryptography``'s, with nothing else to import.
Started by a user other than root, it mounts without ``allow_other`` (the
enclave runs as that user), so no /etc/fuse.conf setting is needed.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

from cove import hostids, util
from cove.decode import Fields, decode_json
from cove.errors import CoveError
from cove.platform import devattest
from cove.platform.devattest import AttestationFs
from cove.platform.reports import EnclaveClaims, ReportSigner

IDENTITY_KEYS = ("measurement", "signer", "product_id", "svn", "debug", "backend", "isolation", "instance_id")
IDENTITY_LIMIT = 65536


@dataclass(frozen=True)
class SealingIdentity:
    measurement: bytes
    signer: bytes
    product_id: int
    svn: int
    debug: bool


def claims_from_json(data: object) -> EnclaveClaims:
    """The enclave identity as the runtime writes it (runtime.attestation_service.identity_json), each field
    checked; any other shape is one ValueError naming the field."""
    fields = Fields(data, "the enclave identity", ValueError, allowed=IDENTITY_KEYS)
    return EnclaveClaims(
        measurement=fields.hex("measurement"),
        signer=fields.hex("signer"),
        product_id=fields.integer("product_id", 0, 0xFFFF),
        svn=fields.integer("svn", 0, 0xFFFF),
        debug=fields.boolean("debug"),
        backend=fields.text("backend"),
        isolation=fields.text("isolation"),
        instance_id=fields.text("instance_id"),
    )


def sealing_keys(claims: EnclaveClaims) -> dict:
    """keys/ entries, if this installation has sealing keys (cove.platform.sealing)."""
    try:
        from cove.platform import sealing
    except ImportError:
        return {}
    derive = getattr(sealing, "sealing_key", None) or getattr(sealing, "derive_key", None)
    if derive is None:
        return {}
    identity = SealingIdentity(claims.measurement, claims.signer, claims.product_id, claims.svn, claims.debug)
    return {f"_sgx_{policy}": (lambda p=policy: derive(identity, p)) for policy in ("mrenclave", "mrsigner")}


def platform_signer() -> tuple[ReportSigner | None, str | None]:
    """The platform's report signer, or why there is none."""
    from cove.platform import monitor

    try:
        return monitor.signer(), None
    except CoveError as exc:
        return None, exc.line()


def build(
    claims: EnclaveClaims, loaded: tuple[ReportSigner | None, str | None] | None = None
) -> tuple[AttestationFs, str | None]:
    """The file system, and why it can only say "none" (None when it can quote)."""
    signer, why_none = loaded or platform_signer()
    if signer is None:
        return AttestationFs("none", None, None, sealing_keys(claims)), why_none
    return AttestationFs(
        "cove",
        lambda rd: signer.evidence(claims, rd),
        lambda rd: signer.signed_report(claims, rd),
        sealing_keys(claims),
    ), None


def _load(into: list[tuple[ReportSigner | None, str | None]]) -> None:
    """The platform signer, on the loader thread; an unexpected fault is one line on stderr (the log)."""
    try:
        into.append(platform_signer())
    except Exception as exc:  # noqa: BLE001 - reported as one line, and main() ends without serving
        print(f"cove: the platform key could not be loaded: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def _stop_when_orphaned(parent: int) -> None:
    """A fallback for the parent-death signal: SIGTERM ourselves once the parent is gone."""
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> int:
    parent = os.getppid()
    if len(argv) > 1:
        print(
            "usage: python -m cove.platform.devattest_server [MOUNTPOINT] < identity.json "
            "(without MOUNTPOINT, stdin's first line names it)",
            file=sys.stderr,
        )
        return 2

    def leave(signum, frame):  # SIGTERM (or the parent's death) ends the loop; the mount is detached on the way out
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, leave)
    loaded: list[tuple[ReportSigner | None, str | None]] = []
    loader = None
    if argv:  # started for a known enclave: the key, then the mount, then "ready"
        loaded.append(platform_signer())
    else:
        # started early (cove.runtime.attestation_early.prestart): the key (and TPM), which do not depend on the
        # enclave, load while the runtime verifies the build; the mount does not wait for them (below)
        loader = threading.Thread(target=_load, args=(loaded,), daemon=True)
        loader.start()
    mountpoint = argv[0] if argv else sys.stdin.readline().rstrip("\n")
    text = sys.stdin.read()
    if not mountpoint or not text.strip():
        return 2  # the runtime did not need it after all (another backend, a failed check)
    try:
        claims = claims_from_json(decode_json(text, ValueError, "the enclave identity", limit=IDENTITY_LIMIT))
    except ValueError as exc:  # the runtime wrote it, so this is a bug or tampering: one line, no traceback
        print(f"cove: {exc}", file=sys.stderr)
        return 2
    root = os.geteuid() == 0
    try:  # root may allow others; the mount sits in a folder only they and root reach
        fd = devattest.mount(mountpoint, allow_other=root)
    except OSError as exc:
        print(f"cove: cannot mount /dev/attestation at {mountpoint}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    # Until "ready", an ending leaves the mount dead (ENOTCONN), never detached: the runtime may be on its way to
    # the sandbox's bind of it, which must then fail (the run is refused) rather than bind the empty folder
    # beneath; the runtime's stop detaches it. For the same reason the watcher comes only after "ready".
    detach = False
    watcher = None
    try:
        threading.Thread(target=_stop_when_orphaned, args=(parent,), daemon=True).start()
        if loader is not None and loader.is_alive():
            # the key is still loading: the runtime goes on meanwhile, up to the sandbox's bind of the mount,
            # which waits in the kernel (as would any request) until this loop answers; "ready" (or "ready
            # none") follows
            print("mounted", flush=True)
            loader.join()
        if not loaded:
            # _load said why; the mount stays, dead (ENOTCONN), so the sandbox's bind of it fails and the run is
            # refused, as when the key fails before the mount; the runtime's stop detaches it
            return 1
        fs, why_none = build(claims, loaded[0])
        if root:  # root started it: the enclave runs as other host ids (cove.hostids)
            fs.uid, fs.gid = hostids.enclave_range().host(0, 0)
        gc.freeze()  # what was loaded stays; the loop makes no cycles worth a pause
        print("ready" if why_none is None else f"ready none: {why_none}", flush=True)
        detach = True
        # the mount goes when this process has gone, however it ends (kill -9 included), not only by the finally
        # below; made after the line the runtime waits for, so the fork is off the start's path (without one,
        # one line on stderr and the mount is served all the same: an ending here would detach the mount the
        # sandbox is about to bind)
        watcher = util.watch_mount(mountpoint, "/dev/attestation")
        devattest.serve(fd, fs)
    finally:
        if detach:
            devattest.unmount(mountpoint)
        if watcher is not None:
            watcher.release()  # unmounted: not the watcher's to detach any more (if it is still there, it stays)
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
