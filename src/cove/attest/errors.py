"""The one error a verifier raises.

Every rejection of evidence, whether malformed, badly signed, out of date or
untrusted, is a :class:`VerificationError` whose message starts with the
evidence type and names the reason, so callers and users see one clear line.
"""

from __future__ import annotations

from cove.errors import CoveError


class VerificationError(CoveError):
    """Evidence was rejected; the message says which check failed."""

    exit_code = 5
