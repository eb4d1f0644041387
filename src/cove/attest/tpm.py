"""Verify a TPM 2.0 quote: signature, nonce and PCR digest.

The platform level of Cove's trust is a TPM quote over the boot PCRs; this
module checks one against an attestation key the caller already trusts.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cove.attest._keys import load_public_key, verify_ecdsa, verify_rsa
from cove.attest.errors import VerificationError
from cove.attest.tpm_structs import (
    HASH_SIZES,
    ClockInfo,
    TpmPublic,
    parse_attest,
    parse_pcr_file,
    parse_public,
    parse_signature,
)

# An attestation key in any form a caller has it: a key, a parsed TPM2B_PUBLIC, or its bytes (PEM, DER, TPM2B_PUBLIC).
AkPublic = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | TpmPublic | bytes | bytearray | str

PcrValues = dict[str, dict[int, bytes]]


@dataclass(frozen=True)
class TpmQuoteClaims:
    """What a verified quote proves."""

    pcrs: PcrValues  # only the quoted PCRs: {hash: {index: value}}
    pcr_digest: bytes
    extra_data: bytes
    qualified_signer: bytes
    clock_info: ClockInfo
    firmware_version: int
    signature_scheme: str
    signature_hash: str


def _ak_key(ak_public: AkPublic) -> PublicKeyTypes:
    """The AK as a cryptography key, from a key object, TpmPublic, PEM/DER or TPM2B_PUBLIC."""
    if isinstance(ak_public, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        return ak_public
    if isinstance(ak_public, (bytes, bytearray, str)):
        raw = ak_public.encode() if isinstance(ak_public, str) else bytes(ak_public)
        return _ak_key_from_bytes(raw)
    return _ak_key_parsed(ak_public)


@lru_cache(maxsize=128)
def _ak_key_from_bytes(raw: bytes) -> PublicKeyTypes:
    """Keys by their exact encoding: a verifier sees the same few AKs again and again."""
    if raw.lstrip().startswith(b"-----BEGIN") or not (len(raw) >= 2 and int.from_bytes(raw[:2], "big") == len(raw) - 2):
        return load_public_key(raw, "tpm", "AK public key")
    return _ak_key_parsed(parse_public(raw))


def _ak_key_parsed(ak_public: object) -> PublicKeyTypes:
    if isinstance(ak_public, TpmPublic):
        try:
            if ak_public.type == "rsa":
                n = int.from_bytes(ak_public.rsa_modulus, "big")
                return rsa.RSAPublicNumbers(ak_public.rsa_exponent, n).public_key()
            curve: dict[str, Callable[[], ec.EllipticCurve]] = {
                "secp256r1": ec.SECP256R1,
                "secp384r1": ec.SECP384R1,
                "secp521r1": ec.SECP521R1,
            }
            nums = ec.EllipticCurvePublicNumbers(
                int.from_bytes(ak_public.ecc_x, "big"),
                int.from_bytes(ak_public.ecc_y, "big"),
                curve[ak_public.ecc_curve](),
            )
            return nums.public_key()
        except ValueError as exc:
            raise VerificationError(f"tpm: AK public key is invalid ({exc})") from None
    raise VerificationError(f"tpm: AK public key of unsupported type {type(ak_public).__name__}")


def _pcr_values(pcrs: bytes | Mapping[str, Mapping[int, bytes]]) -> PcrValues:
    if isinstance(pcrs, (bytes, bytearray, memoryview)):
        return parse_pcr_file(bytes(pcrs))
    if isinstance(pcrs, Mapping):
        try:
            return {str(h): {int(i): bytes(v) for i, v in bank.items()} for h, bank in pcrs.items()}
        except (TypeError, ValueError, AttributeError):
            raise VerificationError("tpm: PCR values must map hash name to {index: bytes}") from None
    raise VerificationError(f"tpm: PCR values of unsupported type {type(pcrs).__name__}")


def verify_tpm_quote(
    attest: bytes,
    signature: bytes,
    pcrs: bytes | Mapping[str, Mapping[int, bytes]],
    ak_public: AkPublic,
    nonce: bytes | None,
    *,
    event_log_check: Callable[[PcrValues], None] | None = None,
) -> TpmQuoteClaims:
    """Verify a quote; ``nonce=None`` leaves the freshness check to the caller.

    ``event_log_check`` receives the verified PCR values and may raise
    VerificationError if an event-log replay does not reproduce them.
    """
    quote = parse_attest(attest)
    sig = parse_signature(signature)
    key = _ak_key(ak_public)
    if sig.sig_alg == "ecdsa":
        verify_ecdsa(key, encode_dss_signature(sig.r, sig.s), bytes(attest), sig.hash_alg, "tpm", "quote")
    else:
        verify_rsa(key, sig.signature, bytes(attest), sig.hash_alg, sig.sig_alg == "rsapss", "tpm", "quote")
    if nonce is not None and not hmac.compare_digest(quote.extra_data, bytes(nonce)):
        raise VerificationError("tpm: quote extraData does not match the nonce", "the quote is stale or replayed")
    values = _pcr_values(pcrs)
    quoted: PcrValues = {}
    h = hashlib.new(sig.hash_alg)
    for sel in quote.pcr_select:
        bank = values.get(sel.hash_alg, {})
        for idx in sel.pcrs:
            value = bank.get(idx)
            if value is None:
                raise VerificationError(f"tpm: no value given for quoted PCR {sel.hash_alg}:{idx}")
            if len(value) != HASH_SIZES[sel.hash_alg]:
                raise VerificationError(f"tpm: value for PCR {sel.hash_alg}:{idx} has the wrong length")
            h.update(value)
            quoted.setdefault(sel.hash_alg, {})[idx] = value
    if not hmac.compare_digest(h.digest(), quote.pcr_digest):
        raise VerificationError("tpm: PCR digest mismatch", "the PCR values are not the ones quoted")
    if event_log_check is not None:
        event_log_check(quoted)
    return TpmQuoteClaims(
        pcrs=quoted,
        pcr_digest=quote.pcr_digest,
        extra_data=quote.extra_data,
        qualified_signer=quote.qualified_signer,
        clock_info=quote.clock_info,
        firmware_version=quote.firmware_version,
        signature_scheme=sig.sig_alg,
        signature_hash=sig.hash_alg,
    )


def replay_event_log(events: Iterable[tuple[int, str, bytes]], banks: tuple[str, ...] = ("sha256",)) -> PcrValues:
    """PCR values from (pcr, hash, digest) events, each extended from zeros."""
    out: PcrValues = {b: {} for b in banks}
    for pcr, alg, digest in events:
        if alg not in out:
            continue
        cur = out[alg].get(pcr, bytes(HASH_SIZES[alg]))
        out[alg][pcr] = hashlib.new(alg, cur + digest).digest()
    return out


def public_key(ak_public: AkPublic) -> PublicKeyTypes:
    """A TPM key (TpmPublic, TPM2B_PUBLIC, PEM or DER) as a ``cryptography`` public key."""
    return _ak_key(ak_public)
