"""From a checked bundle to the container's process: verify, copy, wait for `start`, launch.

The container's process is the runtime itself, forked by cove.oci.create:
it holds the engine's stdio (or the console's terminal), loads what the
launch needs (``warm``), blocks on the start FIFO, then runs the enclave
(``run``) through ``launcher.run_verified`` from the private root copied out
of the bundle (``stored=True``: already verified, bound as is), exactly as
the node service's supervisor launches from its store, and exits with the
program's exit code, so the engine's reaper sees what `cove run` returns.
"""

from __future__ import annotations

import os
import posixpath
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

from cove.config import host_paths
from cove.errors import CoveError, IntegrityError
from cove.image.artifacts import VerifiedBuild
from cove.image.encryption import EncryptedImage
from cove.oci import DOMAIN
from cove.oci import rootfs as rootfs_mod
from cove.oci import spec as spec_mod
from cove.oci.spec import Bundle, BundleError


@dataclass(frozen=True)
class Prepared:
    bundle: Bundle
    verified: VerifiedBuild
    root: Path  # the private verified copy, or the bundle's rootfs for an encrypted image (checked on read)
    encrypted: EncryptedImage | None
    build_dir: Path
    state_dir: Path
    program: str
    unmeasured: bool = False


def prepare(bundle: Bundle, folder: Path) -> Prepared:
    """Verify the bundle's signed build and root file system; refuse what the measurement does not allow."""
    try:
        verified, encrypted = rootfs_mod.load_build(bundle.rootfs, folder / "signed")
        if encrypted is None:
            root = rootfs_mod.copy_signed(bundle.rootfs, verified.entries, folder / "root")
        else:
            root = bundle.rootfs
    except IntegrityError as exc:
        if not bundle.unmeasured_debug:
            raise
        return _unmeasured(bundle, folder, exc)
    verified = _cluster_settings(bundle, verified)
    config = verified.config
    named = host_paths(config, ca_file=False)  # the node's broker CA is what cluster images name
    if named:  # opened as root for whoever made the pod: the engine's mounts are the way in (refused too)
        raise BundleError(
            f"the image's cove.toml names host paths ({'; '.join(named)}): cove-runtime runs enclaves as root "
            "for the container engine, and opens no host path an image names; run such an instance with `cove run`"
        )
    if encrypted is not None and encrypted.key.partition(":")[0] not in ("seal", "kbs", "insecure"):
        # /.cove/image.key is not measured: a file: source would have root read a host path the image chose
        raise BundleError(
            f"the image's encrypted root takes its key from a {encrypted.key.partition(':')[0][:16]!r} source: "
            "cove-runtime opens no host path an image names; build it with --encrypt-image seal:... or kbs:..."
        )
    process = bundle.process
    if encrypted is None:
        if config.process.user == "root":  # the common case, without loading the launcher before the fork
            uid, gid = 0, 0
        else:
            from cove.runtime import launcher

            uid, gid = launcher.resolve_user(config.process.user, root)
        if (process.uid, process.gid) != (uid, gid):
            raise BundleError(
                f"config.json: process.user {process.uid}:{process.gid} is not the enclave's "
                f"measured user {config.process.user} ({uid}:{gid})"
            )
    if process.cwd != posixpath.normpath(config.process.cwd):
        raise BundleError(
            f"config.json: process.cwd {process.cwd} is not the enclave's measured cwd {config.process.cwd}"
        )
    program = spec_mod.program_path(process, root if encrypted is None else None, "config.json")
    state_dir = folder / "state"
    state_dir.mkdir(mode=0o700)
    return Prepared(bundle, verified, root, encrypted, folder / "signed" / "build", state_dir, program)


def _cluster_settings(bundle: Bundle, verified: VerifiedBuild) -> VerifiedBuild:
    """What Cove's Kubernetes pieces annotate (docs/formats/k8s-annotations.md), within the measurement.

    The cluster may tighten the enclave's memory (cove.dev/enclave-memory-mib); it
    cannot point a measured enclave at another key broker: a cove.dev/kbs-url
    that differs from the measured [attestation] kbs is refused. An enclave
    without [attestation] fetches nothing, so the broker annotations do not
    concern it.
    """
    import dataclasses

    notes = bundle.annotations
    config = verified.config
    url = notes.get(f"{DOMAIN}/kbs-url")
    if url and config.attestation is not None and url != config.attestation.kbs:
        raise BundleError(
            f"annotation {DOMAIN}/kbs-url {url} is not the enclave's measured key broker {config.attestation.kbs}",
            "package the enclave with that broker in [attestation], or change the cluster's kbs settings",
        )
    memory = notes.get(f"{DOMAIN}/enclave-memory-mib")
    if memory is not None:
        if not memory.isdigit() or int(memory) == 0:
            raise BundleError(f"annotation {DOMAIN}/enclave-memory-mib {memory!r} is not a number of MiB")
        limit = int(memory) << 20
        if limit < config.resources.memory:  # only ever lower than measured
            resources = dataclasses.replace(config.resources, memory=limit)
            verified = dataclasses.replace(verified, config=dataclasses.replace(config, resources=resources))
    return verified


def _unmeasured(bundle: Bundle, folder: Path, why: IntegrityError) -> Prepared:
    """Run what the bundle holds as a debug enclave, measured as found, signed by a key made for this run.

    Only with the cove.dev/unmeasured-debug annotation. The enclave's identity
    says debug (so every report does, and default policies refuse it), its
    signer is an ephemeral key nobody else holds, and the engine is told once.
    """
    import json
    import shutil

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cove import config as config_mod
    from cove.image import manifest as manifest_mod, signing
    from cove.image.artifacts import VerifiedBuild
    from cove.image.template import config_template
    from cove.image.tree import entry_for, walk

    shutil.rmtree(folder / "signed", ignore_errors=True)
    process = bundle.process
    text = config_template("unmeasured")
    for old, new in (
        ("debug = false ", "debug = true "),
        ('cwd = "/"', f"cwd = {json.dumps(process.cwd)}"),
        ('user = "root"', f'user = "{process.uid}:{process.gid}"'),
        ('entry_points = ["/bin/", "/usr/bin/"]', 'entry_points = ["/"]'),
    ):
        text = text.replace(old, new, 1)
    config = config_mod.parse(text, source="the unmeasured debug configuration")
    root = folder / "root"
    shutil.copytree(
        bundle.rootfs,
        root,
        symlinks=True,
        ignore=lambda where, names: [".cove"] if Path(where) == bundle.rootfs else [],
        copy_function=rootfs_mod.copy_regular,  # as root: a FIFO or device in the layer is never opened
    )
    entries = []
    for rel, st in walk(root):
        try:
            entries.append(entry_for(root, rel, st))
        except CoveError:
            (root / rel).unlink()  # devices and fifos an engine made: the sandbox brings its own /dev
    manifest = manifest_mod.make(config_mod.to_measured(config), entries)
    signature = signing.sign(Ed25519PrivateKey.generate(), manifest.encoded)
    verified = VerifiedBuild(manifest, signature, entries, config)
    print(
        f"cove-runtime: warning: UNMEASURED DEBUG enclave ({why.message}): run because of the "
        f"cove.dev/unmeasured-debug annotation; its reports say debug, its signer is a key made for this run",
        file=sys.stderr,
        flush=True,
    )
    state_dir = folder / "state"
    state_dir.mkdir(mode=0o700)
    return Prepared(
        bundle,
        verified,
        root,
        None,
        folder,
        state_dir,
        spec_mod.program_path(bundle.process, root, "config.json"),
        unmeasured=True,
    )


# What a launch imports; loaded while the container waits for `start` (a name that moved only costs the wait).
WARM_MODULES = (
    "cove.runtime.launcher",
    "cove.runtime.sim",
    "cove.runtime.limits",
    "cove.runtime.provisioning",
    "cove.runtime.seccomp",
    "cove.runtime.securefs_mounts",
    "cove.runtime.attestation_service",
    "cove.daemon.attestation",
)
_node_checked: bool | None = None


def warm() -> None:
    """Load the launch's modules and ask the node service once, before `start`."""
    import importlib

    global _node_checked
    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    _node_checked = _node_attestation()


NODE_ROOT = "/var/lib/cove"  # the node service's --root (COVE_NODE_ROOT in the runtime's environment)
PER_RUN_ATTESTATION, NODE_ATTESTATION = "cove.runtime.attestation_service:services", "cove.daemon.attestation:services"


def _node_attestation() -> bool:
    """Serve /dev/attestation from the node service's server when it runs, as its supervisors do.

    One process that already holds the platform key answers for every
    enclave, instead of a server started (and the key loaded) per container.
    Without a node service the container gets its own server, as `cove run`.
    """
    from cove.daemon import attestation
    from cove.runtime import enclave_services as services_mod

    control = Path(os.environ.get("COVE_NODE_ROOT") or NODE_ROOT) / "attestation.sock"
    try:
        answered = bool(attestation.request(str(control), {"op": "status"}, timeout=5).get("ok"))
    except (OSError, ValueError):
        answered = False
    if not answered:  # a process that asked before (a fork of one) must not keep an earlier node's server
        services_mod.FACTORIES[:] = [
            PER_RUN_ATTESTATION if f == NODE_ATTESTATION else f for f in services_mod.FACTORIES
        ]
        return False
    attestation.CONTROL = str(control)
    services_mod.FACTORIES[:] = [NODE_ATTESTATION if f == PER_RUN_ATTESTATION else f for f in services_mod.FACTORIES]
    return True


def run(prepared: Prepared) -> int:
    """Launch the enclave (in the container's process, after `start`); its exit code."""
    bundle = prepared.bundle
    # Cove's services keep the runtime's own environment; the bundle's values reach the enclave only
    # for [env] passthrough names, and never as COVE_* settings of the runtime itself.
    for name in prepared.verified.config.env.passthrough:
        os.environ.pop(name, None)
        if name in bundle.process.env and not name.startswith("COVE_"):
            os.environ[name] = bundle.process.env[name]
    os.environ["COVE_RUNTIME_DIR"] = str(prepared.state_dir.parent)  # its workdirs go where delete looks
    for kind, soft, hard in bundle.process.rlimits:
        try:
            resource.setrlimit(getattr(resource, kind), (soft, hard))  # measured [resources] apply on top
        except (ValueError, OSError, AttributeError):
            raise BundleError(f"config.json: process.rlimits {kind} {soft}:{hard} cannot be set") from None
    if _node_checked is None:
        _node_attestation()
    from cove.runtime import launcher

    request = launcher.RunRequest(prepared.program, tuple(bundle.process.args[1:]))
    if prepared.encrypted is None:
        return launcher.run_verified(
            prepared.verified, prepared.root, request, prepared.state_dir, build_dir=prepared.build_dir, stored=True
        )
    return launcher.run_verified(
        prepared.verified,
        prepared.root,
        request,
        prepared.state_dir,
        encrypted=prepared.encrypted,
        build_dir=prepared.build_dir,
    )
