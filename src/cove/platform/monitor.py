"""The platform monitor: set up the platform key and its endorsement, load them to sign, report status.

``init`` makes (or keeps) the platform attestation key and roots it: in the
host's TPM, in a swtpm it sets up and starts, or nowhere (self-certified).
``signer`` is what the runtime uses before each enclave starts: it loads the
key and the current epoch's endorsement, and opens a new epoch if the
runtime changed or the TPM's Cove PCR no longer holds what the quote says
(a TPM restart, or someone extended it).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from cove.attest import evidence as ev
from cove.errors import CoveError
from cove.platform import endorse, pak
from cove.platform.reports import ReportSigner
from cove.platform.runtime_measurement import runtime_hash
from cove.platform.state import Paths, PlatformConfig
from cove.util import write_atomic

if TYPE_CHECKING:
    from cove.attest.ak_ca import AkCa
    from cove.platform.tpm2 import Tpm

# x509, the AK CA, swtpm and the TPM tools are imported where a TPM-rooted platform or `cove platform` needs
# them: signer() for a self-certified platform (every direct run's /dev/attestation server) loads none of them


@dataclass(frozen=True)
class InitOptions:
    tpm: str = "auto"  # "auto" (the host's TPM if any), "none", "swtpm", "device"
    tcti: str | None = None  # overrides the device TCTI
    ak_ca: Path | None = None  # an AK CA folder; default: a local one
    ek_chain: Path | None = None  # PEM of the EK certificate's CA chain (device TPMs)
    ek_roots: Path | None = None  # PEM the local AK CA trusts for EK certificates (device TPMs)
    pcr: int = ev.DEFAULT_PCR
    rotate: bool = False  # new platform key
    force: bool = False  # new key and new AK


def _tpm_of(config: PlatformConfig) -> Tpm:
    """The TPM of a TPM-rooted platform's configuration."""
    if not config.tcti:
        raise CoveError(
            "the platform configuration names a TPM but not how to reach it", "run `cove platform init` again"
        )
    from cove.platform.tpm2 import Tpm

    return Tpm(config.tcti)


def _choose(options: InitOptions, paths: Paths, say: Callable[[str], None]) -> PlatformConfig:
    from cove.platform.swtpm import SwTpm
    from cove.platform.tpm2 import device_tcti

    if options.tpm == "none":
        return PlatformConfig(root="self-certified")
    if options.tpm == "swtpm":
        sw = SwTpm(paths.swtpm)
        if not sw.manufactured:
            say("manufacturing a swtpm (EK and EK certificate from a local CA)")
        sw.setup()
        started = sw.start()
        say(f"swtpm running at {started}")
        return PlatformConfig(root="tpm", tcti=started, swtpm=True, pcr=options.pcr)
    tcti = options.tcti or device_tcti()
    if tcti is None:
        if options.tpm == "device":
            raise CoveError("this host has no TPM (/dev/tpmrm0)", "use --swtpm for development, or --no-tpm")
        say("no TPM on this host: the platform key will be self-certified")
        return PlatformConfig(root="self-certified")
    return PlatformConfig(root="tpm", tcti=tcti, pcr=options.pcr)


def _ek_chain(tpm: Tpm, config: PlatformConfig, options: InitOptions, paths: Paths) -> tuple[bytes, ...]:
    from cove.platform.swtpm import SwTpm

    chain = [tpm.ek_certificate()]
    if config.swtpm:
        chain += SwTpm(paths.swtpm).ek_intermediates()
    elif options.ek_chain is not None:
        chain += list(endorse.pem_to_der(Path(options.ek_chain).read_bytes()))
    return tuple(chain)


def _ak_ca(options: InitOptions, config: PlatformConfig, paths: Paths, ek_chain: tuple[bytes, ...]) -> tuple[AkCa, str]:
    from cove.attest.ak_ca import AkCa
    from cove.platform.swtpm import SwTpm

    if options.ak_ca is not None:
        return AkCa.load(options.ak_ca), str(Path(options.ak_ca).resolve())
    local = paths.local_ak_ca
    if (local / "ca.pem").exists():
        return AkCa.load(local), str(local)
    if config.swtpm:
        roots = SwTpm(paths.swtpm).ek_roots_pem()
    elif options.ek_roots is not None:
        roots = Path(options.ek_roots).read_bytes()
    else:
        raise CoveError(
            "a TPM's EK certificate needs a trusted root to certify the AK against",
            "give --ek-roots FILE (the TPM vendor's CA) or --ak-ca DIR",
        )
    return AkCa.create(local, roots, name="Cove local AK CA"), str(local)


def init(
    options: InitOptions = InitOptions(), paths: Paths | None = None, say: Callable[[str], None] = lambda _: None
) -> dict:
    """Set up (or refresh) the platform; returns :func:`status`."""
    paths = paths or Paths()
    with paths.locked():
        old = paths.read_config()
        config = _choose(options, paths, say)
        tpm = _tpm_of(config) if config.root == "tpm" else None
        if tpm is not None and not tpm.reachable():
            raise CoveError(f"the TPM at {config.tcti} is not reachable", "check the device, or use --swtpm")
        same_root = (
            old is not None
            and old.root == config.root
            and old.swtpm == config.swtpm
            and (config.swtpm or old.tcti == config.tcti)
        )
        renew_key = options.rotate or options.force or not same_root or not paths.pak_public.exists()
        if renew_key:
            key = pak.generate()
            pak.save(paths, key, tpm)
            say(
                f"new platform attestation key {ev.pak_hash(pak.spki(key)).hex()}"
                + (" (sealed to the TPM)" if tpm else " (root-only file)")
            )
        spki = pak.public(paths)
        runtime = runtime_hash()
        if tpm is None:
            config = replace(config, ak_ca=None)
            endorsement = endorse.self_certified(spki, runtime)
            for stale in (paths.ak_public, paths.ak_chain, paths.ek_chain):
                stale.unlink(missing_ok=True)
        else:
            ek_chain = _ek_chain(tpm, config, options, paths)
            reuse_ak = (
                not options.force
                and same_root
                and old is not None
                and old.ak_handle == config.ak_handle
                and paths.ak_public.exists()
                and paths.ak_chain.exists()
                and (options.ak_ca is None or str(Path(options.ak_ca).resolve()) == old.ak_ca)
                and _ak_present(tpm, config, paths)
            )
            if reuse_ak:
                assert old is not None  # reuse_ak needs the old configuration
                ak_public, ak_chain = paths.ak_public.read_bytes(), endorse.pem_to_der(paths.ak_chain.read_bytes())
                config = replace(config, ak_ca=old.ak_ca)
            else:
                ca, ca_dir = _ak_ca(options, config, paths, ek_chain)
                ak_public, ak_chain = endorse.enroll_ak(tpm, config, ca, ek_chain)
                write_atomic(paths.ak_public, ak_public)
                write_atomic(paths.ak_chain, endorse.der_to_pem(ak_chain))
                config = replace(config, ak_ca=ca_dir)
                from cryptography import x509

                say(
                    f"attestation key certified by {x509.load_der_x509_certificate(ak_chain[-1]).subject.rfc4514_string()}"
                    " after credential activation"
                )
            write_atomic(paths.ek_chain, endorse.der_to_pem(ek_chain))
            endorsement = endorse.tpm_rooted(tpm, config, spki, runtime, ak_public, ak_chain, ek_chain)
            say(f"PCR {config.pcr} extended with the runtime and the platform key; quote taken")
        endorse.save(paths, endorsement)
        paths.write_config(config)
    return status(paths)


def _ak_present(tpm: Tpm, config: PlatformConfig, paths: Paths) -> bool:
    try:
        return tpm.read_public(config.ak_handle) == paths.ak_public.read_bytes()
    except CoveError:
        return False


def _stale(endorsement: ev.Endorsement, config: PlatformConfig, tpm: Tpm | None, spki: bytes) -> bool:
    if endorsement.runtime != runtime_hash() or not hmac.compare_digest(endorsement.pak, spki):
        return True
    if tpm is not None:
        expected = ev.platform_pcr_value(endorsement.runtime, ev.pak_hash(spki))
        return not hmac.compare_digest(tpm.read_pcr(config.pcr), expected)
    return False


def signer(paths: Paths | None = None) -> ReportSigner:
    """The platform key and a current endorsement; a first use makes a self-certified platform."""
    paths = paths or Paths()
    with paths.locked():
        config = paths.read_config()
        if config is None:
            config = PlatformConfig(root="self-certified")
            key = pak.generate()
            pak.save(paths, key, None)
            endorse.save(paths, endorse.self_certified(pak.spki(key), runtime_hash()))
            paths.write_config(config)
        tpm = _tpm_of(config) if config.root == "tpm" else None
        if tpm is not None and not tpm.reachable():
            hint = "start it with `cove platform init --swtpm`" if config.swtpm else "check the TPM device"
            raise CoveError(f"the platform's TPM at {config.tcti} is not reachable", hint)
        key = pak.load(paths, tpm)
        spki = pak.spki(key)
        endorsement = endorse.load(paths)
        if endorsement is None or _stale(endorsement, config, tpm, spki):
            if tpm is None:
                endorsement = endorse.self_certified(spki, runtime_hash())
            else:
                endorsement = endorse.tpm_rooted(
                    tpm,
                    config,
                    spki,
                    runtime_hash(),
                    paths.ak_public.read_bytes(),
                    endorse.pem_to_der(paths.ak_chain.read_bytes()),
                    endorse.pem_to_der(paths.ek_chain.read_bytes()),
                )
            endorse.save(paths, endorsement)
        return ReportSigner(key, endorsement)


def status(paths: Paths | None = None) -> dict:
    """What the platform is, for `cove platform status` (no private key is touched)."""
    paths = paths or Paths()
    config = paths.read_config()
    if config is None:
        return {"initialized": False, "directory": str(paths.dir)}
    endorsement = endorse.load(paths)
    out: dict = {"initialized": True, "directory": str(paths.dir), "root": config.root, "runtime": runtime_hash().hex()}
    if endorsement is not None:
        out.update(
            {
                "platform_key": ev.pak_hash(endorsement.pak).hex(),
                "epoch": endorsement.epoch.hex(),
                "epoch_start": datetime.fromtimestamp(endorsement.epoch_start_ms / 1000, timezone.utc).isoformat(),
                "endorsed_runtime": endorsement.runtime.hex(),
                "current": endorsement.runtime == runtime_hash(),
            }
        )
    if config.root == "tpm":
        from cryptography import x509

        from cove.platform.swtpm import SwTpm

        tpm_info: dict = {
            "tcti": config.tcti,
            "pcr": config.pcr,
            "ak_handle": f"0x{config.ak_handle:08x}",
            "ak_ca": config.ak_ca,
            "swtpm": config.swtpm,
        }
        if config.swtpm:
            sw = SwTpm(paths.swtpm)
            tpm_info["swtpm_pid"] = sw.pid()
            tpm_info["ek_root"] = str(sw.ca / "swtpm-localca-rootca-cert.pem")
        tpm = _tpm_of(config)
        tpm_info["reachable"] = tpm.reachable()
        if tpm_info["reachable"] and endorsement is not None:
            with paths.locked():
                value = tpm.read_pcr(config.pcr)
            expected = ev.platform_pcr_value(endorsement.runtime, ev.pak_hash(endorsement.pak))
            tpm_info["pcr_matches_quote"] = hmac.compare_digest(value, expected)
            out["current"] = out["current"] and tpm_info["pcr_matches_quote"]
        if paths.ek_chain.exists():
            chain = x509.load_pem_x509_certificates(paths.ek_chain.read_bytes())
            tpm_info["ek_certificate_sha256"] = hashlib.sha256(
                endorse.pem_to_der(paths.ek_chain.read_bytes())[0]
            ).hexdigest()
            tpm_info["ek_issuer"] = chain[0].issuer.rfc4514_string()
        if paths.ak_public.exists():
            from cove.attest.tpm_structs import parse_public

            tpm_info["ak_name"] = parse_public(paths.ak_public.read_bytes()).name.hex()
        if config.ak_ca:
            tpm_info["ak_ca_certificate"] = str(Path(config.ak_ca) / "ca.pem")
        if endorsement is not None and endorsement.tpm is not None:
            tpm_info["quoted_pcrs"] = {
                f"sha256:{i}": v.hex() for i, v in sorted(endorsement.tpm.pcrs["sha256"].items())
            }
        out["tpm"] = tpm_info
    return out


def stop(paths: Paths | None = None) -> bool:
    """Stop the platform's swtpm, if it runs one."""
    from cove.platform.swtpm import SwTpm

    paths = paths or Paths()
    return SwTpm(paths.swtpm).stop()
