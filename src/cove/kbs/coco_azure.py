"""``az-snp-vtpm``: an Azure confidential VM's vTPM quote, rooted in its SEV-SNP report.

The shape and the checks are those of guest-components' ``attester/src/az_snp_vtpm``
and Trustee's ``deps/verifier/src/az_snp_vtpm`` (guest-components @
8246e5e0977f6322f0a1b0f77e0739cf1c3e1f74, Trustee @ 78962cd416dcc8a32f9377e0066a28fe21420f69);
everything is checked with what AMD publishes (the ARK/ASK chains) and nothing
from Microsoft beyond the report layout:

``{"version": 1 | 2, "tpm_quote": {"signature": hex, "message": hex, "pcrs": [hex x 24]},
"hcl_report": base64url, "vcek": base64url DER}``

1. the HCL report holds the SNP report (offset 32, 1184 bytes), verified by
   :mod:`cove.attest` with the VCEK against AMD's chain, at VMPL 0;
2. the SNP report's first 32 bytes of REPORT_DATA are the SHA-256 of the HCL
   report's variable data (JSON), which names the vTPM's attestation key (``HCLAkPub``);
3. the vTPM quote verifies with that key, and its PCR digest matches the 24 PCRs;
4. the quote's ``extraData`` is the report data binding this session (and, in
   version 2, the variable data's ``user-data`` starts with it).

Version 0 (the az-cvm-vtpm crate's own quote encoding) is not accepted.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import struct
from dataclasses import replace
from typing import Any, NoReturn

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cove.attest import verifier
from cove.attest.appraisal import Appraisal
from cove.decode import decode_json
from cove.errors import CoveError
from cove.kbs import evidence_appraisal
from cove.kbs.problems import Problem

TEES = ("az-snp-vtpm",)
SNP_REPORT_SIZE = 1184
HCL_HEADER = 32
HCL_REQUEST_HEADER = 20  # data_size, version, report_type, report_data_hash_type, variable_data_size
MAX_HCL_REPORT = 1 << 16


def _fail(detail: str) -> NoReturn:
    raise _invalid(detail)


def _invalid(detail: str) -> Problem:
    return Problem("EvidenceInvalid", f"az-snp-vtpm: {detail}")


def _hex(value: object, what: str) -> bytes:
    try:
        if not isinstance(value, str) or len(value) > 1 << 14:
            raise ValueError
        return bytes.fromhex(value)
    except ValueError:
        _fail(f"{what} must be hex")


def _b64url(value: object, what: str) -> bytes:
    try:
        if not isinstance(value, str) or len(value) > MAX_HCL_REPORT * 2:
            raise ValueError
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        _fail(f"{what} must be base64url")


def parse_hcl_report(hcl: bytes) -> tuple[bytes, bytes]:
    """(the SNP report, the variable data) of an HCL report."""
    if len(hcl) < HCL_HEADER + SNP_REPORT_SIZE + HCL_REQUEST_HEADER or hcl[:4] != b"HCLA":
        _fail("hcl_report is not an HCL attestation report")
    report = hcl[HCL_HEADER : HCL_HEADER + SNP_REPORT_SIZE]
    offset = HCL_HEADER + SNP_REPORT_SIZE
    size = struct.unpack_from("<I", hcl, offset + 16)[0]
    var_data = hcl[offset + HCL_REQUEST_HEADER : offset + HCL_REQUEST_HEADER + size]
    if len(var_data) != size:
        _fail("hcl_report's variable data is truncated")
    return report, var_data


def _ak_pem(var_data: object) -> bytes:
    keys = var_data.get("keys") if isinstance(var_data, dict) else None
    for key in keys if isinstance(keys, list) else []:
        if isinstance(key, dict) and key.get("kid") == "HCLAkPub" and key.get("kty") == "RSA":
            n = int.from_bytes(_b64url(key.get("n"), "HCLAkPub n"), "big")
            e = int.from_bytes(_b64url(key.get("e"), "HCLAkPub e"), "big")
            try:
                public = rsa.RSAPublicNumbers(e, n).public_key()
            except ValueError as exc:
                _fail(f"HCLAkPub is not an RSA key ({exc})")
            return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _fail("the HCL variable data names no RSA HCLAkPub key")


def appraise(
    tee: str,
    evidence: dict[str, Any],
    runtime_data: dict[str, Any],
    anchors: evidence_appraisal.TrustAnchors,
    now: dt.datetime,
) -> Appraisal:
    """The SNP report's appraisal, with the vTPM's PCRs, once every link and the binding hold."""
    from cove.kbs.coco_evidence import pcr_file

    version = evidence.get("version")
    if version not in (1, 2) or type(version) is not int:
        _fail("only evidence versions 1 and 2 are accepted")
    quote = evidence.get("tpm_quote")
    if not isinstance(quote, dict) or not isinstance(quote.get("pcrs"), list) or len(quote["pcrs"]) != 24:
        _fail("tpm_quote must hold signature, message and 24 pcrs")
    message, signature = _hex(quote.get("message"), "tpm_quote.message"), _hex(quote.get("signature"), "signature")
    pcrs = [_hex(value, "a PCR") for value in quote["pcrs"]]
    if any(len(value) != 32 for value in pcrs):
        _fail("each PCR must be 32 bytes (SHA-256)")
    hcl = _b64url(evidence.get("hcl_report"), "hcl_report")
    vcek = _b64url(evidence.get("vcek"), "vcek")
    report, var_data = parse_hcl_report(hcl)

    snp = evidence_appraisal.verify(
        "snp", {"report": base64.b64encode(report).decode(), "vcek": base64.b64encode(vcek).decode()}, anchors, now
    )
    fields = snp.claims.get("report", {}) if isinstance(snp.claims, dict) else {}
    if fields.get("vmpl") != 0:
        _fail(f"the SNP report was made at VMPL {fields.get('vmpl')}, not 0 (the HCL's)")
    if not hmac.compare_digest(hashlib.sha256(var_data).digest(), (snp.report_data or b"")[:32]):
        _fail("the SNP report's REPORT_DATA is not the hash of the HCL variable data")
    variables = decode_json(var_data, _invalid, "the HCL variable data")
    # RSASSA with SHA-256, as a TPMT_SIGNATURE: sigAlg, hash, TPM2B signature
    tpmt = struct.pack(">HHH", 0x0014, 0x000B, len(signature)) + signature
    try:
        vtpm = verifier.verify(
            message,
            kind="tpm",
            now=now,
            inputs=verifier.Inputs(tpm_signature=tpmt, tpm_pcrs=pcr_file(pcrs), ak=_ak_pem(variables)),
        )
    except CoveError as exc:
        _fail(f"the vTPM quote: {exc.line()}")
    extra = vtpm.report_data or b""
    evidence_appraisal.check_binding(extra, runtime_data)
    if version >= 2:
        user = variables.get("user-data") if isinstance(variables, dict) else None
        if not isinstance(user, str) or not hmac.compare_digest(_hex(user, "user-data")[: len(extra)], extra):
            _fail("the HCL variable data's user-data does not start with the quote's report data")
    return replace(
        snp,
        report_data=extra,
        pcrs=vtpm.pcrs,
        backend=tee,
        isolation=f"{snp.isolation} (vTPM quote through the HCL)" if snp.isolation else tee,
    )
