"""Attestation and release policies: the attestation policy language, applied by the broker.

The broker evaluates two kinds of policy, both written in the language of
:mod:`cove.attest.policy` (docs/policy.md) and evaluated by its
:func:`~cove.attest.policy.evaluate`:

- its **attestation policy** (``cove kbs serve --policy``): what evidence it
  accepts at ``/kbs/v0/attest`` at all. The default is
  :func:`cove.attest.policy.default_policy`: cove, tpm, sgx, tdx and snp
  evidence, no debug enclave, no self-certified platform, TCB up to date;
  ``sample`` evidence only where a policy names it;
- each secret's **release policy** (stored by name in the database): which
  attested enclaves may receive it, e.g.::

      types = ["cove"]
      [cove]
      measurements = ["<hex>"]

Both are evaluated on the normalized claims of the evidence; the report
data binding (nonce and TEE key) is the broker's own check, done before.
Release policies carry their certificates (``roots``, ``ek_ca``, ``ak_ca``)
inline as PEM text: a file name in one is refused.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cove.attest import policy as attest_policy
from cove.attest.appraisal import Appraisal
from cove.kbs.problems import Problem

Policy = attest_policy.Policy


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    policy_id: str = ""


def load(text: str, name: str = "policy", allow_paths: bool = False) -> Policy:
    """Parse a policy (TOML or JSON); a PolicyInvalid problem names the fault.

    Certificates must be inline (PEM text) unless ``allow_paths``: release
    policies come through the admin API and must not make the broker read
    its own files. Only the operator's attestation policy may name files.
    """
    try:
        return attest_policy.parse_policy(text, source=name, allow_paths=allow_paths)
    except attest_policy.PolicyError as exc:
        raise Problem("PolicyInvalid", exc.line()) from None


def decide(policy: Policy, appraisal: Appraisal, now: dt.datetime | None = None) -> Decision:
    result = attest_policy.evaluate(policy, appraisal, now=now)
    if result.accepted:
        reason = "accepted" + (f" with warnings: {'; '.join(result.warnings)}" if result.warnings else "")
        return Decision(True, reason, result.policy_id)
    return Decision(False, "; ".join(result.reasons), result.policy_id)


def default_attestation_policy() -> Policy:
    return attest_policy.default_policy()
