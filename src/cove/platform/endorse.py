"""Endorsing the platform key for one epoch: a TPM quote, or a self-certified statement.

An epoch begins when the platform key, the runtime or the TPM's state
changes. For a TPM-rooted platform it resets Cove's PCR, extends it with the
runtime measurement and the platform key hash, and takes one quote over the
boot PCRs and that PCR, with qualifying data binding the key, runtime and
epoch. Reports reuse that quote until the epoch ends: the TPM is asked once
per epoch, never per report.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from cove.attest import evidence as ev
from cove.platform.state import Paths, PlatformConfig
from cove.util import write_atomic

if TYPE_CHECKING:
    from cove.attest.ak_ca import AkCa
    from cove.platform.tpm2 import Tpm

# x509 and the TPM structures are imported by the functions that use them (a TPM-rooted platform, a stale
# endorsement, `cove platform init`): a self-certified platform's signer loads neither


def _new_epoch() -> tuple[bytes, int]:
    return os.urandom(16), int(time.time() * 1000)


def self_certified(pak: bytes, runtime: bytes) -> ev.Endorsement:
    epoch, start = _new_epoch()
    return ev.Endorsement(root="self-certified", pak=pak, runtime=runtime, epoch=epoch, epoch_start_ms=start)


def tpm_rooted(
    tpm: Tpm,
    config: PlatformConfig,
    pak: bytes,
    runtime: bytes,
    ak_public: bytes,
    ak_chain: tuple[bytes, ...],
    ek_chain: tuple[bytes, ...],
) -> ev.Endorsement:
    """Reset and extend Cove's PCR, then quote it with the boot PCRs."""
    from cove.attest.tpm_structs import parse_pcr_file

    epoch, start = _new_epoch()
    tpm.reset_and_extend(config.pcr, [runtime, ev.pak_hash(pak)])
    selection = sorted(set(ev.BOOT_PCRS) | {config.pcr})
    attest, signature, pcr_file = tpm.quote(config.ak_handle, selection, ev.quote_qualifier(pak, runtime, epoch, start))
    return ev.Endorsement(
        root="tpm",
        pak=pak,
        runtime=runtime,
        epoch=epoch,
        epoch_start_ms=start,
        tpm=ev.TpmEndorsement(
            attest=attest,
            signature=signature,
            pcrs=parse_pcr_file(pcr_file),
            pcr=config.pcr,
            ak=ak_public,
            ak_chain=ak_chain,
            ek_chain=ek_chain,
        ),
    )


def enroll_ak(
    tpm: Tpm, config: PlatformConfig, ca: AkCa, ek_chain: tuple[bytes, ...]
) -> tuple[bytes, tuple[bytes, ...]]:
    """Make a new AK and have ``ca`` certify it by credential activation: (TPM2B_PUBLIC, chain)."""
    ak_public = tpm.create_ak(config.ak_handle)
    now = datetime.now(timezone.utc)
    challenge = ca.challenge(ek_chain, ak_public, now, tpm.ek_public())
    secret = tpm.activate_credential(config.ak_handle, challenge.credential)
    return ak_public, ca.finish(challenge, secret, now)


def der_to_pem(certs: tuple[bytes, ...] | list[bytes]) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return b"".join(x509.load_der_x509_certificate(c).public_bytes(serialization.Encoding.PEM) for c in certs)


def pem_to_der(pem: bytes) -> tuple[bytes, ...]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return tuple(c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(pem))


def save(paths: Paths, endorsement: ev.Endorsement) -> None:
    write_atomic(paths.endorsement, ev.encode_endorsement(endorsement), mode=0o644)


def load(paths: Paths) -> ev.Endorsement | None:
    try:
        data = Path(paths.endorsement).read_bytes()
    except FileNotFoundError:
        return None
    return ev.load_endorsement(data, "stored endorsement")
