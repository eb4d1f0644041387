"""Attestation: parsing and verifying hardware evidence (TPM, SGX, TDX, SEV-SNP).

Each verifier takes raw evidence, the caller's trust anchors and a
verification time, and returns typed claims or raises
:class:`~cove.attest.errors.VerificationError` naming the failed check.
"""

from cove.attest.dcap import DcapClaims, verify_dcap_quote, verify_sgx_quote, verify_tdx_quote
from cove.attest.dcap_collateral import DcapCollateral, parse_collateral
from cove.attest.errors import VerificationError
from cove.attest.snp import SnpClaims, verify_snp_report
from cove.attest.tpm import TpmQuoteClaims, verify_tpm_quote

__all__ = [
    "DcapClaims",
    "DcapCollateral",
    "SnpClaims",
    "TpmQuoteClaims",
    "VerificationError",
    "parse_collateral",
    "verify_dcap_quote",
    "verify_sgx_quote",
    "verify_snp_report",
    "verify_tdx_quote",
    "verify_tpm_quote",
]
