"""Attestation and release policies, in the attestation policy language.

The broker evaluates two kinds of policy on the claims of appraised evidence:
its **attestation policy** (``--policy``; what evidence it accepts at all:
by default no debug enclave, no self-certified or sample evidence, TCB up to
date) and each secret's **release policy** (which enclaves may receive it).
Both are written in one declarative language (TOML or JSON): a policy
accepts when any one of its ``[[accept]]`` rules matches every claim it
names; a rule names

- ``tee``: accepted tee types (a list);
- ``measurement``, ``signer``: accepted values (hex; a string or a list);
- ``product_id``; ``min_svn``;
- ``debug``: ``true`` lets debug enclaves pass (default: refused);
- ``self_certified``: ``true`` lets self-certified evidence pass (default: refused);
- ``backend``, ``isolation``: accepted values;
- ``tcb_status``: accepted statuses (default ``["UpToDate"]``);
- ``pcrs``: ``{ sha256 = { "16" = "hex" } }``: required PCR values.

:func:`load` parses; :meth:`Policy.evaluate` returns the decision and, for a
refusal, the reason of the closest rule.
"""

from __future__ import annotations

import hmac
import json
import tomllib
from dataclasses import dataclass

from cove.kbs.problems import Problem

DEFAULT_ATTESTATION_POLICY = """\
# The broker's default attestation policy: real TEEs and TPM-rooted Cove
# enclaves, no debug enclaves, no self-certified or sample evidence.
[[accept]]
tee = ["cove", "tpm", "sgx", "tdx", "snp"]
tcb_status = ["UpToDate"]
"""

_RULE_KEYS = ("tee", "measurement", "signer", "product_id", "min_svn", "debug", "self_certified",
              "backend", "isolation", "tcb_status", "pcrs")


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


class Policy:
    def __init__(self, rules: list[dict], text: str):
        self.rules = rules
        self.text = text

    def evaluate(self, claims: dict) -> Decision:
        reasons = []
        for index, rule in enumerate(self.rules):
            problem = _mismatch(rule, claims)
            if problem is None:
                return Decision(True, f"accepted by rule {index + 1}")
            reasons.append(problem)
        if not reasons:
            return Decision(False, "the policy has no accept rules")
        return Decision(False, reasons[0] if len(reasons) == 1 else "; ".join(
            f"rule {i + 1}: {r}" for i, r in enumerate(reasons)))


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _hex_in(value, accepted: list) -> bool:
    if not isinstance(value, str):
        return False
    return any(isinstance(a, str) and hmac.compare_digest(value.lower().encode(), a.lower().encode())
               for a in accepted)


def _mismatch(rule: dict, claims: dict) -> str | None:
    tee = claims.get("tee")
    if "tee" in rule and tee not in _as_list(rule["tee"]):
        return f"tee {tee} is not accepted"
    if tee == "sample" and "sample" not in _as_list(rule.get("tee", [])):
        return "sample evidence is accepted only by a rule naming tee = [\"sample\"]"
    if claims.get("debug") and not rule.get("debug", False):
        return "the enclave is a debug enclave"
    if claims.get("self_certified") and not rule.get("self_certified", False) and tee != "sample":
        return "the evidence is self-certified (no TPM-rooted platform key)"
    for name in ("measurement", "signer"):
        if name in rule and not _hex_in(claims.get(name), _as_list(rule[name])):
            return f"{name} {claims.get(name) or '(none)'} is not accepted"
    if "product_id" in rule and claims.get("product_id") != rule["product_id"]:
        return f"product_id {claims.get('product_id')} is not {rule['product_id']}"
    if "min_svn" in rule:
        svn = claims.get("svn")
        if not isinstance(svn, int) or svn < rule["min_svn"]:
            return f"svn {svn} is below {rule['min_svn']}"
    for name in ("backend", "isolation"):
        if name in rule and claims.get(name) not in _as_list(rule[name]):
            return f"{name} {claims.get(name)} is not accepted"
    statuses = _as_list(rule.get("tcb_status", ["UpToDate"]))
    if "tcb_status" in claims and claims["tcb_status"] not in statuses:
        return f"TCB status {claims['tcb_status']} is not accepted"
    for alg, bank in (rule.get("pcrs") or {}).items():
        have = (claims.get("pcrs") or {}).get(alg, {})
        for index, value in bank.items():
            if not _hex_in(have.get(str(index)), [value]):
                return f"PCR {alg}:{index} is not the expected value"
    return None


def load(text: str, name: str = "policy") -> Policy:
    """Parse a policy (TOML, or JSON when it starts with '{'); a PolicyInvalid problem names the fault."""
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise Problem("PolicyInvalid", f"{name}: not valid TOML or JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"accept", "description"}:
        extra = sorted(set(data) - {"accept", "description"}) if isinstance(data, dict) else ["(not a table)"]
        raise Problem("PolicyInvalid", f"{name}: unknown key {extra[0]} (a policy holds [[accept]] rules)")
    rules = data.get("accept", [])
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise Problem("PolicyInvalid", f"{name}: accept must be a list of rules ([[accept]])")
    for index, rule in enumerate(rules):
        where = f"{name}: accept[{index}]"
        for key, value in rule.items():
            if key not in _RULE_KEYS:
                raise Problem("PolicyInvalid", f"{where}.{key}: unknown key (allowed: {', '.join(_RULE_KEYS)})")
            if key in ("debug", "self_certified") and not isinstance(value, bool):
                raise Problem("PolicyInvalid", f"{where}.{key}: must be true or false")
            if key in ("product_id", "min_svn") and (isinstance(value, bool) or not isinstance(value, int)):
                raise Problem("PolicyInvalid", f"{where}.{key}: must be an integer")
            if key in ("tee", "measurement", "signer", "backend", "isolation", "tcb_status"):
                if not all(isinstance(v, str) for v in _as_list(value)):
                    raise Problem("PolicyInvalid", f"{where}.{key}: must be a string or a list of strings")
            if key == "pcrs" and not (isinstance(value, dict) and all(
                    isinstance(b, dict) and all(isinstance(v, str) for v in b.values()) for b in value.values())):
                raise Problem("PolicyInvalid", f"{where}.pcrs: must be {{ sha256 = {{ \"16\" = \"hex\" }} }}")
    return Policy(rules, text)


def default_attestation_policy() -> Policy:
    return load(DEFAULT_ATTESTATION_POLICY, "default attestation policy")


def for_measurement(measurement: str, tee: str = "cove", **extra) -> str:
    """A release policy text accepting one measurement (what `cove demo` and tests write)."""
    lines = ["[[accept]]", f'tee = ["{tee}"]', f'measurement = ["{measurement}"]']
    for key, value in extra.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"
