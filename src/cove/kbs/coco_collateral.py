"""DCAP collateral for quotes that arrive without it (the CoCo SGX and TDX attesters send only the quote).

Trustee's verifiers fetch it from a PCCS (``deps/verifier/src/intel_dcap`` @
78962cd416dcc8a32f9377e0066a28fe21420f69). The broker looks first in a local
collateral folder the operator fills with ``cove kbs collateral import`` (one
file per TEE type and FMSPC, the collateral JSON of
docs/formats/kbs-evidence.md), then asks the PCCS given by ``--pccs``.
Collateral is public and signed; the verifier checks every signature,
validity window and revocation list against the trust anchors, so neither
source is trusted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cryptography import x509

from cove.decode import Fields, decode_json
from cove.errors import CoveError
from cove.kbs.problems import Problem
from cove.util import write_atomic

MAX_COLLATERAL = 1 << 20
_FMSPC = re.compile(r"^[0-9a-f]{12}$")


def quote_fmspc(tee: str, quote: bytes) -> str:
    """The FMSPC of the platform that made the quote, from the PCK certificate it carries."""
    from cove.attest.dcap_quote import parse_dcap_quote
    from cove.attest.pck import parse_pck_extension

    try:
        parsed = parse_dcap_quote(quote)
        chain = x509.load_pem_x509_certificates(parsed.cert.pck_chain_pem)
        return parse_pck_extension(chain[0], tee).fmspc.hex()
    except CoveError as exc:
        raise Problem("EvidenceInvalid", f"{tee}: {exc.line()}") from None
    except (ValueError, IndexError, AttributeError, TypeError) as exc:
        raise Problem("EvidenceInvalid", f"{tee}: the quote carries no readable PCK certificate ({exc})") from None


def collateral_fmspc(tee: str, collateral: dict[str, Any]) -> str:
    """The FMSPC a collateral document is for (its TCB info), after checking that it parses."""
    from cove.attest.dcap_collateral import parse_collateral

    try:
        parse_collateral(collateral, tee)
        info = collateral["tcb_info"]
        if isinstance(info, str):  # parse_collateral read it already; this reads it the same way
            info = decode_json(info, CoveError, "the collateral's tcb_info")
        tcb = Fields(info, "the collateral's tcb_info", CoveError)
        fmspc = tcb.text("fmspc").lower()
        made_for = "tdx" if tcb.has("id") and tcb.map["id"] == "TDX" else "sgx"
    except CoveError as exc:
        raise CoveError(f"the collateral does not parse: {exc.line()}") from None
    if made_for != tee:
        raise CoveError(f"this is {made_for} collateral, not {tee} collateral", f"import it with --tee {made_for}")
    if not _FMSPC.match(fmspc):
        raise CoveError(f"the collateral's FMSPC {fmspc!r} is not 6 bytes of hex")
    return fmspc


class CollateralSource:
    """Where the broker finds collateral: a folder (``<tee>-<fmspc>.json``), then a PCCS URL."""

    def __init__(self, folder: Path | None = None, pccs: str | None = None):
        self.folder = Path(folder) if folder else None
        self.pccs = pccs

    def path(self, tee: str, fmspc: str) -> Path:
        assert self.folder is not None and tee in ("sgx", "tdx") and _FMSPC.match(fmspc)
        return self.folder / f"{tee}-{fmspc}.json"

    def import_file(self, tee: str, source: Path) -> Path:
        """Check a collateral JSON file and store it for its FMSPC (atomically); where it went."""
        if self.folder is None:
            raise CoveError("no collateral folder")
        try:
            raw = Path(source).read_bytes()
        except OSError as exc:
            raise CoveError(f"cannot read {source}: {exc.strerror}") from None
        if len(raw) > MAX_COLLATERAL:
            raise CoveError(f"{source} is larger than {MAX_COLLATERAL >> 20} MiB: not DCAP collateral")

        def not_json(message: str) -> CoveError:
            return CoveError(f"{source} is {message}", "give the collateral JSON (docs/formats/kbs-evidence.md)")

        collateral = decode_json(raw, not_json, "", limit=MAX_COLLATERAL)
        if not isinstance(collateral, dict):
            raise CoveError(f"{source} is not a collateral object")
        fmspc = collateral_fmspc(tee, collateral)
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o755)
        target = self.path(tee, fmspc)
        write_atomic(target, json.dumps(collateral, sort_keys=True).encode(), mode=0o644)
        return target

    def collateral_for(self, tee: str, quote: bytes) -> dict[str, Any]:
        """Collateral for this quote's platform, or EvidenceInvalid saying how to provide it."""
        fmspc = quote_fmspc(tee, quote)
        if self.folder is not None:

            def unreadable(message: str) -> Problem:
                return Problem(
                    "Unavailable", f"{tee}: the broker's collateral for FMSPC {fmspc} is unreadable: {message}"
                )

            try:
                raw = self.path(tee, fmspc).read_bytes()
            except FileNotFoundError:
                raw = None
            except OSError as exc:
                raise unreadable(str(exc)) from None
            found = None if raw is None else decode_json(raw, unreadable, "it", limit=MAX_COLLATERAL)
            if isinstance(found, dict):
                return found
        if self.pccs:
            from cove.attest.collateral_fetch import Fetcher

            try:
                return Fetcher(pccs=self.pccs, cache_dir=self.folder / "pccs" if self.folder else None).dcap(tee, quote)
            except CoveError as exc:
                raise Problem("EvidenceInvalid", f"{tee}: {exc.line()}") from None
        raise Problem(
            "EvidenceInvalid",
            f"{tee}: the broker has no collateral for FMSPC {fmspc}; its operator "
            f"imports it with `cove kbs collateral import` or serves with --pccs",
        )
