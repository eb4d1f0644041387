"""Evaluate an :class:`~cove.attest.appraisal.Appraisal` against a :class:`~cove.attest.policy.Policy`.

Every rule that fails adds a reason and marks the component it concerns
(``platform``: the TCB, platform key and roots; ``enclave``: what runs and the
data it bound) as contraindicated; a rule passed only because the policy
relaxed it (debug, self-certified, a TCB status below up to date) marks it
as a warning. Nothing short-circuits, so a rejection lists every reason.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import datetime, timedelta, timezone

from cove.attest.appraisal import Appraisal
from cove.attest.policy import Policy, PolicyResult, Rules

CLOCK_SKEW = timedelta(seconds=60)  # evidence dated this far in the future is still accepted


def _eq(a: bytes | None, b: bytes) -> bool:
    return a is not None and hmac.compare_digest(a, b)


class _Verdict:
    def __init__(self, appraisal: Appraisal):
        self.reasons: list[str] = []
        self.warnings: list[str] = []
        self.components = {"platform": "affirming"}
        if appraisal.evidence_type != "tpm":
            self.components["enclave"] = "affirming"
        self.report_component = "enclave" if "enclave" in self.components else "platform"

    def deny(self, component: str, reason: str) -> None:
        self.reasons.append(reason)
        self.components[component] = "contraindicated"

    def warn(self, component: str, reason: str) -> None:
        self.warnings.append(reason)
        if self.components.get(component) == "affirming":
            self.components[component] = "warning"


def evaluate(
    policy: Policy,
    appraisal: Appraisal,
    *,
    nonce: bytes | None = None,
    report_data: bytes | None = None,
    now: datetime | None = None,
) -> PolicyResult:
    v = _Verdict(appraisal)
    kind = appraisal.evidence_type
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    if kind not in policy.types:
        v.deny(
            v.report_component,
            f"evidence type {kind} is not accepted by this policy "
            f"(accepted: {', '.join(sorted(policy.types)) or 'none'})",
        )
    rules = policy.rules_for(kind)
    _identity(v, rules, appraisal)
    _platform(v, rules, appraisal, now)
    _init_data(v, rules, appraisal)
    _freshness(v, policy, appraisal, nonce, report_data, now)
    return PolicyResult(
        accepted=not v.reasons,
        reasons=tuple(v.reasons),
        components=dict(v.components),
        warnings=tuple(v.warnings),
        policy_id=policy.id,
    )


def _identity(v: _Verdict, rules: Rules, a: Appraisal) -> None:
    """What runs: measurement or signer, svn, debug, backend and isolation."""
    if rules.measurements or rules.signers:
        by_measurement = any(_eq(a.measurement, m) for m in rules.measurements)
        by_signer = any(
            _eq(a.signer, s.signer)
            and (s.product_id is None or a.product_id == s.product_id)
            and (a.svn is not None and a.svn >= s.min_svn)
            for s in rules.signers
        )
        if not (by_measurement or by_signer):
            what = a.measurement.hex() if a.measurement is not None else "none"
            detail = ""
            if rules.signers and a.signer is not None:
                detail = f", signer {a.signer.hex()} product {a.product_id} svn {a.svn}"
            v.deny("enclave", f"measurement {what}{detail} is not one the policy accepts")
    if a.debug:
        if rules.debug:
            v.warn("enclave", "debug enclave accepted by the policy")
        else:
            v.deny("enclave", "debug enclave (its memory and state can be read by the host)")
    if rules.backends and a.backend is not None and a.backend not in rules.backends:
        v.deny("enclave", f"backend {a.backend} is not accepted (accepted: {', '.join(rules.backends)})")
    if rules.isolation and a.isolation is not None and a.isolation not in rules.isolation:
        v.deny("enclave", f"isolation {a.isolation} is not accepted (accepted: {', '.join(rules.isolation)})")
    if rules.launch_measurements and not any(_eq(a.launch_measurement, m) for m in rules.launch_measurements):
        got = a.launch_measurement.hex() if a.launch_measurement is not None else "absent (no vTPM quote)"
        v.deny("enclave", f"vm launch measurement {got} is not one the policy accepts")
    for idx, want in sorted(rules.rtmrs.items()):
        rtmr = a.rtmrs[idx] if idx < len(a.rtmrs) else None
        if not _eq(rtmr, want):
            v.deny("enclave", f"RTMR{idx} is {rtmr.hex() if rtmr else 'absent'}, the policy expects {want.hex()}")


def _platform(v: _Verdict, rules: Rules, a: Appraisal, now: datetime) -> None:
    """Where it runs: platform root, TCB status and levels, runtime, PCRs, platform key."""
    if a.platform_root == "self-certified":
        if rules.self_certified:
            v.warn("platform", "self-certified platform key accepted by the policy (no TPM vouches for it)")
        else:
            v.deny("platform", "platform key is self-certified: no TPM or hardware vouches for it")
    if a.tcb_status is not None:
        if a.tcb_status not in rules.tcb_statuses:
            v.deny("platform", f"TCB status {a.tcb_status} is not accepted (accepted: {', '.join(rules.tcb_statuses)})")
        elif a.tcb_status != "UpToDate":
            v.warn("platform", f"TCB status {a.tcb_status} accepted by the policy")
    for part, minimum in sorted(rules.min_tcb.items()):
        level = a.tcb.get(part)
        if level is None or level < minimum:
            v.deny("platform", f"TCB {part} level {level} is below the policy's minimum {minimum}")
    if rules.runtime_hashes and not any(_eq(a.runtime, h) for h in rules.runtime_hashes):
        v.deny("platform", f"Cove runtime {a.runtime.hex() if a.runtime else 'unknown'} is not one the policy accepts")
    if rules.platform_keys and not any(_eq(a.platform_key, k) for k in rules.platform_keys):
        v.deny(
            "platform",
            f"platform key {a.platform_key.hex() if a.platform_key else 'unknown'} is not one the policy accepts",
        )
    if rules.ek_certificates and not any(_eq(a.ek_certificate, h) for h in rules.ek_certificates):
        v.deny(
            "platform",
            f"TPM EK certificate {a.ek_certificate.hex() if a.ek_certificate else 'none'} "
            "is not one the policy accepts (another TPM, or no TPM)",
        )
    if rules.ak_names and not any(_eq(a.ak_name, n) for n in rules.ak_names):
        v.deny(
            "platform",
            f"TPM attestation key {a.ak_name.hex() if a.ak_name else 'none'} "
            "is not one the policy accepts (another AK, or no TPM)",
        )
    for bank, values in sorted(rules.pcrs.items()):
        quoted = a.pcrs.get(bank, {})
        for idx, want in sorted(values.items()):
            got = quoted.get(idx)
            if got is None:
                v.deny("platform", f"PCR {bank}:{idx} is not in the quote")
            elif not _eq(got, want):
                v.deny("platform", f"PCR {bank}:{idx} is {got.hex()}, the policy expects {want.hex()}")
    if rules.max_platform_age is not None:
        if a.platform_issued_at is None:
            v.deny("platform", "the platform endorsement carries no time; the policy limits its age")
        else:
            age = (now - a.platform_issued_at).total_seconds()
            if age > rules.max_platform_age:
                v.deny(
                    "platform",
                    f"platform endorsement is {age:.0f}s old; the policy allows "
                    f"{rules.max_platform_age:.0f}s (run `cove platform init` again)",
                )


def _init_data(v: _Verdict, rules: Rules, a: Appraisal) -> None:
    """The init-data the evidence is bound to: its digest, and values of its ``data`` table."""
    if not rules.wants_init_data:
        return
    c = v.report_component
    if a.init_data is None:
        v.deny(c, "the evidence carries no init-data; the policy requires it")
        return
    if rules.init_data_digests and not any(_eq(a.init_data, d) for d in rules.init_data_digests):
        v.deny(c, f"init-data digest {a.init_data.hex()} is not one the policy accepts")
    data = a.init_data_claims if isinstance(a.init_data_claims, dict) else {}
    for name, accepted in sorted(rules.init_data.items()):
        if name not in data:
            v.deny(c, f"init-data has no data key {name!r}; the policy requires one")
            continue
        got = _json(data[name])
        if not any(hmac.compare_digest(got, _json(want)) for want in accepted):
            v.deny(
                c,
                f"init-data data key {name!r} has a value the policy does not accept "
                f"(sha256 {hashlib.sha256(got).hexdigest()[:16]})",
            )


def _json(value: object) -> bytes:
    """One form for a value read from TOML, JSON claims or the policy, to compare them."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def _freshness(
    v: _Verdict, policy: Policy, a: Appraisal, nonce: bytes | None, report_data: bytes | None, now: datetime
) -> None:
    """Nonce, expected report data and maximum age."""
    c = v.report_component
    bound = a.report_data
    if nonce is not None:
        if not nonce:
            v.deny(c, "the nonce is empty")
        elif bound is None:
            v.deny(c, "the evidence binds no data, so it cannot carry a nonce")
        elif a.evidence_type == "tpm":
            if not (len(bound) == len(nonce) and hmac.compare_digest(bound, nonce)):
                v.deny(c, "quote extraData does not match the nonce (stale or replayed)")
        elif len(nonce) > len(bound) or not hmac.compare_digest(bound[: len(nonce)], nonce):
            v.deny(c, "report data does not start with the nonce (stale or replayed evidence)")
    elif policy.freshness.nonce_required:
        v.deny(c, "the policy requires a nonce and none was given")
    if report_data is not None:
        if bound is None or not (len(bound) == len(report_data) and hmac.compare_digest(bound, report_data)):
            v.deny(c, "report data does not match the expected value")
    if a.issued_at is not None:
        if a.issued_at - now > CLOCK_SKEW:
            v.deny(c, f"evidence is dated {(a.issued_at - now).total_seconds():.0f}s in the future")
        elif policy.freshness.max_age is not None:
            age = (now - a.issued_at).total_seconds()
            if age > policy.freshness.max_age:
                v.deny(c, f"evidence is {age:.0f}s old; the policy allows at most {policy.freshness.max_age:g}s")
    elif policy.freshness.max_age is not None:
        v.deny(c, f"{a.evidence_type} evidence carries no time, so its age cannot be checked; use a nonce")
