"""Attestation: parsing and verifying evidence (Cove, TPM, SGX, TDX, SEV-SNP), policies, tokens, RA-TLS.

Each verifier takes raw evidence, the caller's trust anchors and a
verification time, and returns typed claims or raises
:class:`~cove.attest.errors.VerificationError` naming the failed check.
:mod:`cove.attest.verifier` picks the verifier and normalizes the claims;
:mod:`cove.attest.policy` appraises them; :mod:`cove.attest.ear` signs the
result; :mod:`cove.attest.ratls` binds evidence to TLS keys.

Names are imported on first use, so a process that only signs reports (the
/dev/attestation server, started for every enclave) does not load verifiers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CoveClaims": "cove.attest.cove_evidence_verify",
    "verify_cove_evidence": "cove.attest.cove_evidence_verify",
    "DcapClaims": "cove.attest.dcap",
    "verify_dcap_quote": "cove.attest.dcap",
    "verify_sgx_quote": "cove.attest.dcap",
    "verify_tdx_quote": "cove.attest.dcap",
    "DcapCollateral": "cove.attest.dcap_collateral",
    "parse_collateral": "cove.attest.dcap_collateral",
    "VerificationError": "cove.attest.errors",
    "SnpClaims": "cove.attest.snp",
    "verify_snp_report": "cove.attest.snp",
    "TpmQuoteClaims": "cove.attest.tpm",
    "verify_tpm_quote": "cove.attest.tpm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cove.attest' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
