"""Services the runtime provides to an enclave from outside it.

A service (an encrypted mount served through FUSE, the /dev/attestation
folder) is started before the program, gets a private folder on the host,
and hands back the binds the sandbox needs; it is stopped after the program
ends. Each part of Cove that serves something registers a factory below, so
the launcher never needs to know what is served.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cove.config import Config
from cove.image.identity import EnclaveIdentity

if TYPE_CHECKING:
    from cove.attest.evidence import VtpmQuote


@dataclass(frozen=True)
class Bind:
    """A host path the sandbox sees at target."""

    host: Path
    target: str
    writable: bool = False


@dataclass(frozen=True)
class ServiceContext:
    identity: EnclaveIdentity
    config: Config
    instance_id: str
    backend: str
    isolation: str
    state_dir: Path  # the enclave's persistent state on the host (instance/run/)
    workdir: Path  # private to this run, removed afterwards
    image_key: str | None = None  # the key source of an encrypted root image (cove build --encrypt-image)
    vtpm_quote: Callable[[bytes], VtpmQuote] | None = None  # vm: adds its vTPM quote to the runtime's evidence


class EnclaveService(ABC):
    def begin(self, ctx: ServiceContext) -> None:
        """Optionally start slow work early; runs while the image is verified and copied."""

    @abstractmethod
    def start(self, ctx: ServiceContext) -> list[Bind]:
        """Be ready to serve; return what the sandbox must see."""

    @abstractmethod
    def stop(self) -> None:
        """Stop serving and flush; called once the program has ended."""

    def environment(self) -> dict[str, str]:
        """Variables to add to the program's environment (e.g. provisioned secrets)."""
        return {}


# "module:function" factories returning the services a context needs.
FACTORIES: list[str] = [
    "cove.runtime.attestation_service:services",
    "cove.runtime.provisioning:services",
    "cove.runtime.securefs_mounts:services",
]


def services_for(ctx: ServiceContext) -> list[EnclaveService]:
    found: list[EnclaveService] = []
    for spec in FACTORIES:
        module, _, name = spec.partition(":")
        factory: Callable[[ServiceContext], list[EnclaveService]] = getattr(importlib.import_module(module), name)
        found.extend(factory(ctx))
    return found
