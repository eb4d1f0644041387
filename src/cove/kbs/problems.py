"""Problem documents (RFC 7807): one type and one HTTP status per kind of refusal.

Each refusal the broker makes is a :class:`Problem` whose ``kind`` names it
(``PolicyDeny``, ``EvidenceBinding`` ...). Types that the Trustee KBS defines
keep Trustee's names; Cove's additions are listed in docs/kbs.md. The
``type`` member is a URN, ``urn:cove:kbs:error:<kind>``: an identifier, not
a link.
"""

from __future__ import annotations

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

    def document(self, instance: str | None = None) -> dict:
        doc = {"type": TYPE_PREFIX + self.kind, "title": KINDS[self.kind][1],
               "status": self.status, "detail": self.detail}
        if instance:
            doc["instance"] = instance
        return doc


def kind_of(document: dict) -> str | None:
    """The kind named by a problem document's type, if it is one of ours."""
    value = document.get("type") if isinstance(document, dict) else None
    if isinstance(value, str) and value.startswith(TYPE_PREFIX):
        return value[len(TYPE_PREFIX):]
    return None
