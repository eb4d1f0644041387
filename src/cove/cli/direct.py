"""`cove run` without the daemon (direct mode), free of click so the plain form can skip it.

Both `cove run` (cove.cli.run) and the plain form's early path
(cove.cli.attached) come here. The node-less run starts the per-run
/dev/attestation server's interpreter first, so that its start overlaps the
imports and the verification of this one (cove.runtime.attestation_early).
"""

from __future__ import annotations

import errno
from pathlib import Path

from cove.errors import CoveError, FileSystemError


def run(
    directory: Path,
    program: str,
    args: tuple[str, ...],
    backend: str | None = None,
    debug_shell: bool = False,
    package: Path | None = None,
    signer: bytes | None = None,
    state_dir: Path | None = None,
) -> int:
    """Verify and run PROGRAM of the instance in ``directory`` (or of ``package``); its exit code."""
    from cove.runtime import attestation_early

    if _may_attest(backend, package, directory):
        attestation_early.prestart()  # its interpreter starts while this one imports and verifies
    try:
        from cove.image import instance as instance_mod
        from cove.runtime import launcher

        request = launcher.RunRequest(program, tuple(args), backend, debug_shell, signer, state_dir)
        try:
            if package is not None:
                return launcher.run_package(package, request)
            target = instance_mod.open_instance(directory)
            return launcher.run_instance(target.root, request)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise runtime_dir_full(launcher.runtime_dir(), package, directory) from None
    finally:
        attestation_early.discard()


def _may_attest(backend: str | None, package: Path | None, directory: Path) -> bool:
    """Whether a direct run will likely serve /dev/attestation itself (not a vm: its guest serves it)."""
    from cove.image import instance as instance_mod

    if backend == "vm":
        return False
    if package is not None or backend is not None:
        return True
    try:
        return instance_mod.open_instance(directory).config().enclave.backend != "vm"
    except CoveError:
        return False  # the run reports it


def runtime_dir_full(where: Path, package: Path | None, directory: Path) -> FileSystemError:
    """The enclave's root (or an unpacked package) did not fit: say how much it needs and where to put it."""
    import shutil
    import tarfile

    from cove.image import artifacts

    needed: int | None
    try:
        if package is not None:
            with tarfile.open(package, "r:gz") as archive:
                needed = sum(member.size for member in archive)
        else:
            needed = artifacts.load_manifest(directory / "build")[0].image_bytes
    except (CoveError, OSError, tarfile.TarError, EOFError):
        needed = None
    free = shutil.disk_usage(where).free if where.is_dir() else 0
    size = f"about {_mb(needed)}" if needed else "about the image's size"
    return FileSystemError(
        f"no space left in the runtime folder {where} ({_mb(free)} free): the enclave's root "
        f"is copied there, {size} plus its tmpfs contents",
        "set COVE_RUNTIME_DIR to a folder with more space, e.g. COVE_RUNTIME_DIR=/var/tmp",
    )


def _mb(size: int) -> str:
    return f"{size / (1 << 20):.1f} MB"
