"""Problem documents (RFC 7807): one type and one HTTP status per kind of refusal.

Each refusal the broker makes is a :class:`Problem` whose ``kind`` names it
(``PolicyDeny``, ``EvidenceBinding`` ...). Types that the Trustee KBS defines
keep Trustee's names; Cove's additions are listed in docs/kbs.md. The
``type`` member is a URN, ``urn:cove:kbs:error:<kind>``: an identifier, not
a link.

On the attestation protocol's own endpoints (``/kbs/v0/auth``, ``/attest``,
``/resource/...``) a refusal whose kind is a 400 or a 403 is answered 401, as
Trustee answers every protocol and policy failure there (its
``kbs/src/error.rs`` @ 78962cd416dcc8a32f9377e0066a28fe21420f69): the
Confidential Containers client re-runs its handshake on a 401 and gives up on
anything else but 404 (guest-components ``kbs_protocol/src/client/rcar_client.rs``
@ 8246e5e0977f6322f0a1b0f77e0739cf1c3e1f74), so a 400 or 403 there would end
a pod's start without the retry a CoCo deployment expects.
"""

from __future__ import annotations

from typing import Any

TYPE_PREFIX = "urn:cove:kbs:error:"

# kind -> (HTTP status, title)
KINDS: dict[str, tuple[int, str]] = {
    "InvalidRequest": (400, "The request is malformed"),
    "ProtocolVersion": (400, "Unsupported KBS protocol version"),
    "UnknownTee": (400, "Unknown TEE type"),
    "SessionNotFound": (401, "No attestation session: authenticate first"),
    "SessionExpired": (401, "The attestation session has expired"),
    "NonceMismatch": (401, "The runtime data does not carry this session's nonce"),
    "NonceReplayed": (401, "This session's nonce was already used"),
    "EvidenceInvalid": (401, "The evidence did not verify"),
    "EvidenceBinding": (401, "The evidence is not bound to this runtime data and TEE key"),
    "AttestationError": (401, "Attestation failed"),
    "AttestationDeny": (401, "The attestation policy refused the evidence"),
    "TokenNotFound": (401, "No attestation session cookie or token"),
    "TokenVerifierError": (401, "The attestation token is not valid here"),
    "PolicyDeny": (403, "The release policy refused this resource"),
    "InvalidRequestPath": (404, "No such resource"),
    "AdminAuth": (401, "Admin authentication failed"),
    "AdminForbidden": (403, "This admin key's role does not allow the action"),
    "NotExportable": (403, "This secret is never readable by admins"),
    "NotFound": (404, "Not found"),
    "Conflict": (409, "Already exists"),
    "PolicyInvalid": (422, "The policy does not parse"),
    "Unavailable": (503, "The broker cannot serve this now"),
}


PROTOCOL_PATHS = ("/kbs/v0/auth", "/kbs/v0/attest", "/kbs/v0/resource/")


def status_on(status: int, path: str | None) -> int:
    """The HTTP status of a refusal of this status on this path (401 for 400/403 on the protocol's paths)."""
    if status in (400, 403) and path and (path in PROTOCOL_PATHS[:2] or path.startswith(PROTOCOL_PATHS[2])):
        return 401
    return status


class Problem(Exception):
    """A refusal: an RFC 7807 problem document with the right status."""

    def __init__(self, kind: str, detail: str):
        if kind not in KINDS:
            raise ValueError(f"unknown problem kind {kind}")
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail

    @property
    def status(self) -> int:
        return KINDS[self.kind][0]

    def document(self, instance: str | None = None) -> dict[str, Any]:
        doc = {
            "type": TYPE_PREFIX + self.kind,
            "title": KINDS[self.kind][1],
            "status": status_on(self.status, instance),
            "detail": self.detail,
        }
        if instance:
            doc["instance"] = instance
        return doc


def kind_of(document: dict[str, Any]) -> str | None:
    """The kind named by a problem document's type, if it is one of ours."""
    value = document.get("type") if isinstance(document, dict) else None
    if isinstance(value, str) and value.startswith(TYPE_PREFIX):
        return value[len(TYPE_PREFIX) :]
    return None
