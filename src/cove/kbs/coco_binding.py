"""Report-data binding and hash negotiation as the Confidential Containers client does them.

The client (guest-components ``attestation-agent/kbs_protocol/src/client/rcar_client.rs``
@ 8246e5e0977f6322f0a1b0f77e0739cf1c3e1f74) offers ``sha256``, ``sha384``,
``sha512`` and ``sm3`` in the Request's ``extra-params.supported-hash-algorithms``,
uses the Challenge's ``extra-params.selected-hash-algorithm`` (SHA-384 when it is
absent), and binds into the primary TEE's report data the hash of the RFC 8785
canonical JSON of ``{"tee-pubkey", "nonce", "additional-evidence"}``, where
``additional-evidence`` is the composite evidence's string (``""`` without
devices). Trustee checks the same (``kbs/src/attestation/backend.rs`` @
78962cd416dcc8a32f9377e0066a28fe21420f69). Device evidence binds the same
object without ``additional-evidence``.
"""

from __future__ import annotations

import json

import rfc8785
from typing import Any

from cove.kbs.problems import Problem

# What the broker selects, best first, from what the client offers. SM3 is not offered back:
# Cove's crypto is pyca/cryptography, which has no SM3.
SELECTABLE = ("sha384", "sha512", "sha256")
DEFAULT = "sha384"  # what a client that offers nothing (or reads no selection) uses


def canonical(value: Any) -> bytes:
    """RFC 8785 (JSON Canonicalization Scheme), as serde_json_canonicalizer writes it.

    Runtime-data is ASCII strings, small integers and objects of them (a nonce, a JWK): for such
    values the standard library's sorted, compact JSON is byte for byte RFC 8785 (code point order
    is UTF-16 order in ASCII, the escapes are the same, integers below 2**53 print alike), at a
    tenth of the cost of the rfc8785 package, which writes everything else (floats, non-ASCII
    text, large integers)."""
    if _plain(value, 0):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise Problem("InvalidRequest", f"runtime-data has no canonical JSON form (RFC 8785): {exc}") from None


_MAX_PLAIN_INT = (1 << 53) - 1


def _plain(value: Any, depth: int) -> bool:
    """Whether value is made of dicts with ASCII keys, lists, ASCII strings, booleans, None and
    integers of at most 53 bits only, nested at most 32 deep (exact types: no subclasses)."""
    kind = type(value)
    if kind is str:
        return bool(value.isascii())
    if kind is dict:
        return depth < 32 and all(type(k) is str and k.isascii() and _plain(v, depth + 1) for k, v in value.items())
    if kind is int:
        return bool(-_MAX_PLAIN_INT <= value <= _MAX_PLAIN_INT)
    if value is None or kind is bool:
        return True
    if kind is list:
        return depth < 32 and all(_plain(v, depth + 1) for v in value)
    return False


# TEEs whose report data is shorter than a SHA-384 digest: the CoCo TPM attester puts the first 32
# bytes of the hash into the quote's extraData (attester/src/tpm: TPM_REPORT_DATA_SIZE), so for it the
# broker selects a hash that fits whole.
PREFERRED = {"tpm": ("sha256",)}


def select_hash(extra_params: object, tee: str = "") -> str:
    """The hash the broker asks for in the Challenge, from the Request's extra-params."""
    if not isinstance(extra_params, dict) or "supported-hash-algorithms" not in extra_params:
        return DEFAULT
    offered = extra_params["supported-hash-algorithms"]
    if not isinstance(offered, list) or len(offered) > 32:
        raise Problem("InvalidRequest", "extra-params.supported-hash-algorithms must be a list of names")
    names = {name.lower() for name in offered if isinstance(name, str)}
    for name in PREFERRED.get(tee, ()) + SELECTABLE:
        if name in names:
            return name
    raise Problem(
        "InvalidRequest",
        f"none of the offered hash algorithms is supported here (the broker binds with {', '.join(SELECTABLE)})",
    )


def primary_runtime_data(runtime_data: dict[str, Any], additional_evidence: str = "") -> dict[str, Any]:
    """What the primary TEE's report data is the hash of."""
    return {
        "tee-pubkey": runtime_data["tee-pubkey"],
        "nonce": runtime_data["nonce"],
        "additional-evidence": additional_evidence,
    }
