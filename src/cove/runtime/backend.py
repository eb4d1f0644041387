"""The backend interface: one enclave abstraction over many isolation mechanisms.

A backend takes a :class:`LaunchSpec` (a verified, private image root, the
program, its environment and the measured configuration) and returns a
:class:`RunningEnclave`, which the launcher signals, waits for and asks for
report claims and sealing identity. `sim` is the first backend; `vm`, `sgx`,
`tdx` and `snp` implement the same two classes without touching callers.
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from cove.config import Config
from cove.errors import CoveError
from cove.image.identity import EnclaveIdentity  # re-exported: backends and services take it from here

if TYPE_CHECKING:
    from cove.attest.evidence import VtpmQuote


@dataclass(frozen=True)
class LaunchSpec:
    identity: EnclaveIdentity
    config: Config
    root: Path  # the verified private image root
    argv: tuple[str, ...]
    env: dict[str, str]
    uid: int
    gid: int
    instance_id: str
    interactive: bool = False  # a debug shell keeps the terminal
    binds: tuple = field(default=())  # cove.runtime.enclave_services.Bind, from the enclave's services
    build_dir: Path | None = None  # the verified build folder (the vm backend's launch inputs are there)
    launch: dict | None = None  # the signed manifest's launch section (backend "vm")
    workdir: Path | None = None  # private to this run, removed afterwards


@dataclass(frozen=True)
class Availability:
    backend: str
    isolation: str
    available: bool
    reason: str = ""


class RunningEnclave(ABC):
    """A launched enclave: signal it, wait for it, ask what it is."""

    def __init__(self, spec: LaunchSpec, backend: str, isolation: str):
        self.spec = spec
        self.backend = backend
        self.isolation = isolation
        self.instance_id = spec.instance_id

    @abstractmethod
    def signal(self, signum: int) -> None:
        """Deliver signum to the program (not to the sandbox machinery)."""

    @abstractmethod
    def wait(self) -> int:
        """Wait for the end; the program's exit code, 128+N if killed by signal N."""

    @abstractmethod
    def stop(self) -> None:
        """End the enclave now and release what it holds."""


class Backend(ABC):
    name: ClassVar[str]
    isolation: ClassVar[str]
    strength: ClassVar[int]  # auto picks the highest available
    # --debug-enclave at the user's terminal: the sandbox starts on a terminal the launcher relays
    # (sim, cove.runtime.terminal), or the backend relays one of its own and the launcher forwards
    # signals as for any run (vm: the terminal is the guest's)
    takes_terminal: ClassVar[bool] = True

    @classmethod
    @abstractmethod
    def availability(cls) -> Availability:
        """Whether this host can run the backend, and if not, why."""

    def prepare(self, build_dir: Path | None, launch: dict | None, workdir: Path) -> None:
        """Check what only this backend boots, before any service starts (and before secrets are
        fetched); may settle ``self.isolation`` (vm: KVM or TCG), which the services report."""

    def release(self) -> None:
        """Stop what :meth:`prepare` started (vm: the vTPM), once the run is over or failed."""

    @contextmanager
    def prepared(self, build_dir: Path | None, launch: dict | None, workdir: Path) -> Iterator[None]:
        """:meth:`prepare`, and :meth:`release` however the run ends."""
        try:
            self.prepare(build_dir, launch, workdir)
            yield
        finally:
            self.release()

    def vtpm_quote(self) -> Callable[[bytes], VtpmQuote] | None:
        """vm: what adds the enclave's vTPM quote to evidence the runtime makes for it; else None."""
        return None

    @abstractmethod
    def launch(self, spec: LaunchSpec) -> RunningEnclave:
        """Start the program in an enclave."""


class PlannedBackend:
    """A backend of the design that this version cannot launch; `cove info` says why."""

    def __init__(self, name: str, isolation: str, device: str | None, note: str):
        self.name, self.isolation, self.device, self.note = name, isolation, device, note

    def availability(self) -> Availability:
        if self.device and not os.path.exists(self.device):
            return Availability(self.name, self.isolation, False, f"no {self.device}")
        return Availability(self.name, self.isolation, False, self.note)


PLANNED = (
    PlannedBackend("sgx", "CPU (Intel SGX)", "/dev/sgx_enclave", "not in this version of Cove"),
    PlannedBackend("tdx", "CPU (Intel TDX)", "/dev/tdx_guest", "not in this version of Cove"),
    PlannedBackend("snp", "CPU (AMD SEV-SNP)", "/dev/sev-guest", "not in this version of Cove"),
)


NAMES = ("sim", "vm")  # the backends this version launches, strongest first (auto takes the first available)


def backend_class(name: str) -> type[Backend]:
    """One backend's class, importing only its module: a run of a `sim` enclave never loads the vm
    backend's (about 10 ms of every direct run's `launch.choose-backend`)."""
    if name == "sim":
        from cove.runtime.sim import SimBackend

        return SimBackend
    if name == "vm":
        from cove.runtime.vm import VmBackend

        return VmBackend
    raise KeyError(name)


def registry() -> dict[str, type[Backend]]:
    return {name: backend_class(name) for name in NAMES}


def all_availability() -> list[Availability]:
    """Every backend Cove knows, launchable or not, with the reason."""
    return [b.availability() for b in registry().values()] + [p.availability() for p in PLANNED]


def choose(configured: str, override: str | None = None) -> Backend:
    """The backend to launch with: an explicit choice must be available; auto takes the strongest."""
    wanted = override or configured
    if wanted == "auto":  # NAMES is in order of strength: the vm backend is not even imported when sim can run
        for name in NAMES:
            candidate = backend_class(name)
            if candidate.availability().available:
                return candidate()
        reasons = "; ".join(f"{a.backend}: {a.reason}" for a in all_availability())
        raise CoveError(f"no backend can run on this host ({reasons})", "run scripts/setup")
    if wanted not in NAMES:
        planned = {p.name: p for p in PLANNED}
        if wanted in planned:
            raise CoveError(f"backend {wanted} is unavailable: {planned[wanted].availability().reason}")
        raise CoveError(f"unknown backend {wanted!r}", f"choose one of: auto, {', '.join(NAMES)}")
    backend = backend_class(wanted)
    state = backend.availability()
    if not state.available:
        raise CoveError(f"backend {wanted} is unavailable: {state.reason}", "run scripts/setup")
    return backend()


def find_tool(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/bin:/bin:/usr/sbin:/sbin")
