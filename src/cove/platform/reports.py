"""Signing enclave reports with the platform key, and wrapping them into evidence.

The caller (the runtime's /dev/attestation service) supplies the enclave's
identity from the verified manifest; the enclave supplies only the 64 bytes
of report data. Nothing else an enclave sends can reach a report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from cove.attest import evidence as ev
from cove.errors import CoveError


@dataclass(frozen=True)
class EnclaveClaims:
    """Who the enclave is and how it runs, as the runtime knows it."""

    measurement: bytes
    signer: bytes
    product_id: int
    svn: int
    debug: bool
    backend: str
    isolation: str
    instance_id: str


class ReportSigner:
    """The platform key and the current epoch's endorsement, ready to sign.

    Reports name the endorsement by its hash, so the platform key's signature
    covers everything in the evidence that no TPM signed (the runtime and
    epoch of a self-certified platform, for one).
    """

    def __init__(self, key: ec.EllipticCurvePrivateKey, endorsement: ev.Endorsement):
        self.key = key
        self.endorsement = endorsement
        self._endorsement = ev.encode_endorsement(endorsement)
        self._endorsement_digest = ev.endorsement_digest(self._endorsement)
        self.platform_key = ev.pak_hash(endorsement.pak)

    @property
    def root(self) -> str:
        return self.endorsement.root

    def report(self, claims: EnclaveClaims, report_data: bytes) -> tuple[bytes, bytes]:
        """(report bytes, DER signature) for ``claims`` binding ``report_data``."""
        if len(report_data) != ev.REPORT_DATA_SIZE:
            raise CoveError(f"report data must be {ev.REPORT_DATA_SIZE} bytes, not {len(report_data)}")
        report = ev.Report(
            measurement=claims.measurement,
            signer=claims.signer,
            product_id=claims.product_id,
            svn=claims.svn,
            debug=claims.debug,
            backend=claims.backend,
            isolation=claims.isolation,
            instance_id=claims.instance_id,
            report_data=bytes(report_data),
            timestamp_ms=int(time.time() * 1000),
            platform_key=self.platform_key,
            root=self.endorsement.root,
            endorsement=self._endorsement_digest,
        )
        data = ev.encode_report(report)
        return data, self.key.sign(ev.REPORT_CONTEXT + data, ec.ECDSA(hashes.SHA256()))

    def evidence(
        self, claims: EnclaveClaims, report_data: bytes, vtpm: Callable[[bytes], ev.VtpmQuote] | None = None
    ) -> bytes:
        """Evidence for ``claims``; a vm enclave's ``vtpm`` quotes its launch PCR for the report's bytes."""
        data, signature = self.report(claims, report_data)
        return ev.encode_evidence(data, signature, self._endorsement, vtpm(data) if vtpm is not None else None)

    def certify_vtpm(self, statement: ev.VtpmStatement) -> tuple[bytes, bytes]:
        """(statement bytes, the platform key's DER signature): this vTPM's keys and launch PCR."""
        data = ev.encode_vtpm_statement(statement)
        return data, self.key.sign(ev.VTPM_CONTEXT + data, ec.ECDSA(hashes.SHA256()))

    def signed_report(self, claims: EnclaveClaims, report_data: bytes) -> bytes:
        """The report alone with its signature (/dev/attestation/report), CBOR."""
        data, signature = self.report(claims, report_data)
        return cbor2.dumps({"report": data, "signature": signature}, canonical=True)
