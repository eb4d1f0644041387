"""Appraisal policies: declarative reference values a verifier checks claims against.

A policy (TOML or JSON, docs/policy.md) says, per evidence type, which
measurements or signers are acceptable, whether debug enclaves,
self-certified platforms and which TCB statuses pass, which platform roots
are trusted, and how fresh evidence must be. The defaults deny: no debug, no
self-certified platform, no TCB status but ``UpToDate``. The key broker reads
its secret-release policies with the same parser and the same
:func:`evaluate`, so one language covers both.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cove.attest.appraisal import EVIDENCE_TYPES, Appraisal
from cove.decode import Settings, decode_json, decode_toml
from cove.errors import CoveError

POLICY_VERSION = 1
DEFAULT_TYPES = ("cove", "tpm", "sgx", "tdx", "snp")  # "sample" only when named
TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
)
SNP_TCB_PARTS = ("bootloader", "tee", "snp", "microcode", "fmc")

_COMMON = ("measurements", "signers", "debug", "tcb_statuses", "backends", "isolation")
# Rules on Confidential Containers init-data, for the types the key broker binds it to (TDX MRCONFIGID,
# SNP HOSTDATA, the vTPM's PCR 8; sample reports it unchecked). Cove and SGX evidence never carry it.
INIT_DATA_KEYS = ("init_data_digests", "init_data")
ALLOWED_KEYS: dict[str, tuple[str, ...]] = {
    "cove": _COMMON
    + (
        "self_certified",
        "platform_keys",
        "runtime_hashes",
        "pcrs",
        "ek_ca",
        "ak_ca",
        "ek_certificates",
        "ak_names",
        "max_platform_age",
        "launch_measurements",
    ),
    "tpm": ("pcrs",) + INIT_DATA_KEYS,
    "sgx": _COMMON + ("roots",),
    "tdx": _COMMON + ("roots", "rtmrs") + INIT_DATA_KEYS,
    "snp": _COMMON + ("roots", "min_tcb") + INIT_DATA_KEYS,
    "sample": _COMMON + INIT_DATA_KEYS,
}


class PolicyError(CoveError):
    """A policy file is missing, malformed or names something unknown."""


@dataclass(frozen=True)
class SignerRule:
    """Accept any measurement from this signer, for this product, at or above this svn."""

    signer: bytes
    product_id: int | None = None
    min_svn: int = 0


@dataclass(frozen=True)
class Rules:
    """Reference values and switches for one evidence type."""

    measurements: tuple[bytes, ...] = ()
    signers: tuple[SignerRule, ...] = ()
    debug: bool = False
    tcb_statuses: tuple[str, ...] = ("UpToDate",)
    backends: tuple[str, ...] = ()
    isolation: tuple[str, ...] = ()
    self_certified: bool = False
    platform_keys: tuple[bytes, ...] = ()
    runtime_hashes: tuple[bytes, ...] = ()
    ek_certificates: tuple[bytes, ...] = ()  # SHA-256 of trusted EK certificates: pin TPMs
    ak_names: tuple[bytes, ...] = ()  # TPM names of trusted attestation keys
    launch_measurements: tuple[bytes, ...] = ()  # vm: accepted launch measurements, quoted by the vTPM
    pcrs: Mapping[str, Mapping[int, bytes]] = field(default_factory=dict)
    ek_ca: tuple[bytes, ...] = ()  # DER certificates
    ak_ca: tuple[bytes, ...] = ()
    roots: tuple[bytes, ...] = ()
    min_tcb: Mapping[str, int] = field(default_factory=dict)
    rtmrs: Mapping[int, bytes] = field(default_factory=dict)
    max_platform_age: float | None = None
    init_data_digests: tuple[bytes, ...] = ()  # accepted init-data digests; set, init-data is required
    init_data: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)  # data key -> accepted values

    @property
    def wants_init_data(self) -> bool:
        return bool(self.init_data_digests or self.init_data)

    def pem(self, name: str) -> bytes:
        """Certificates of one trust-anchor field (ek_ca, ak_ca, roots) as a PEM bundle."""
        return b"".join(
            x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM) for der in getattr(self, name)
        )


@dataclass(frozen=True)
class Freshness:
    nonce_required: bool = False
    max_age: float | None = None  # seconds


@dataclass(frozen=True)
class Policy:
    """A parsed policy; ``id`` names it in attestation results."""

    types: frozenset[str]
    rules: Mapping[str, Rules]
    freshness: Freshness = field(default_factory=Freshness)
    name: str | None = None
    digest: str = ""

    @property
    def id(self) -> str:
        return self.name or f"sha256:{self.digest}"

    def rules_for(self, evidence_type: str) -> Rules:
        return self.rules.get(evidence_type, Rules())


@dataclass(frozen=True)
class PolicyResult:
    """The verdict: accepted or not, every reason, and a status per component."""

    accepted: bool
    reasons: tuple[str, ...]
    components: Mapping[str, str]  # component -> "affirming" | "warning" | "contraindicated"
    warnings: tuple[str, ...] = ()
    policy_id: str = ""


def default_policy() -> Policy:
    """What applies without a policy file: any measurement, nothing weakened."""
    return Policy(types=frozenset(DEFAULT_TYPES), rules={}, name="cove:default")


def is_inline(value: str) -> bool:
    """A policy given as text (TOML or JSON) rather than as a file's path."""
    text = value.strip()
    return "\n" in text or "=" in text or text.startswith("{")


def load_policy(path: str | Path) -> Policy:
    """Read and parse a policy file (TOML, or JSON if it ends in .json or starts with '{')."""
    path = Path(path)
    return parse_policy(read_policy_text(path), source=str(path), base=path.parent)


def read_policy_text(path: str | Path) -> str:
    """A policy file's text, read up to MAX_FILE and no further; a PolicyError naming the file."""
    path = Path(path)
    try:
        raw = _read_bounded(path)
        if raw is None:
            raise PolicyError(f"policy {path}: larger than {MAX_FILE >> 20} MiB, which no policy is")
        return raw.decode()
    except FileNotFoundError:
        raise PolicyError(f"policy {path}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"policy {path}: cannot read: {exc}") from None


MAX_FILE = 1 << 20  # a policy or a certificate it names; /dev/zero must not hang the verifier


def _read_bounded(path: Path) -> bytes | None:
    """The file's bytes, or None if it is larger than MAX_FILE (read no further)."""
    with open(path, "rb") as f:
        data = f.read(MAX_FILE + 1)
    return None if len(data) > MAX_FILE else data


def parse_policy(
    data: str | bytes | Mapping[str, Any], source: str = "policy", base: Path | None = None, allow_paths: bool = True
) -> Policy:
    """A policy from TOML/JSON text or an already-decoded mapping.

    ``allow_paths=False`` refuses certificate file names: a policy from
    elsewhere (the key broker's admin API) carries its certificates inline,
    and must not make the process read its local files.
    """
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    if isinstance(data, str):
        text = data
        data = _decode(text, source)
    if not isinstance(data, Mapping):
        raise PolicyError(f"{source}: a policy must be a table of settings")
    return _Parser(source, base, allow_paths).policy(data)


class _Undecodable(Exception):
    """One of the two forms a policy may take did not decode (the other is tried)."""


def _decode(text: str, source: str) -> Any:
    """JSON when it looks like JSON, otherwise TOML (then JSON as a second try); through cove.decode."""
    try:
        if source.endswith(".json") or text.lstrip().startswith("{"):
            return decode_json(text, _Undecodable, "")
        return decode_toml(text, _Undecodable, "")
    except _Undecodable as exc:
        try:
            return decode_json(text, _Undecodable, "")
        except _Undecodable:
            raise PolicyError(f"{source}: not valid TOML or JSON: {exc}") from None


def evaluate(
    policy: Policy,
    appraisal: Appraisal,
    *,
    nonce: bytes | None = None,
    report_data: bytes | None = None,
    now: datetime | None = None,
) -> PolicyResult:
    """Appraise verified claims against a policy; ``nonce``/``report_data`` are the relying party's."""
    from cove.attest.policy_eval import evaluate as _evaluate

    return _evaluate(policy, appraisal, nonce=nonce, report_data=report_data, now=now)


class _Parser:
    """Reads a decoded policy through cove.decode's Settings; every problem is one PolicyError naming the key.

    The accessor checks shapes (tables, lists, strings, hex, durations); what
    is left here is the policy language's own rules: known evidence types and
    TCB statuses, PCR banks and indexes, signer tables, init-data digests and
    certificates by PEM text or file name.
    """

    def __init__(self, source: str, base: Path | None, allow_paths: bool = True):
        self.source = source
        self.base = base
        self.allow_paths = allow_paths

    def fail(self, key: str, problem: str, hint: str | None = None) -> PolicyError:
        return PolicyError(f"{self.source}: {key}: {problem}", hint)

    def table(
        self, data: object, key: str, allowed: Collection[str] | None, unknown: str = "unknown setting"
    ) -> Settings:
        """cove.decode's one accessor over a table of the policy, worded as the policy language's errors."""
        return Settings(data, key, PolicyError, allowed, source=self.source, unknown=unknown, allowed_hint="allowed")

    def policy(self, data: Mapping[str, Any]) -> Policy:
        known = ("version", "name", "types", "freshness") + EVIDENCE_TYPES
        top = self.table(data, "", known)
        version = data.get("version", POLICY_VERSION)
        if version != POLICY_VERSION:
            raise self.fail("version", f"policy version {version!r} is not supported (only {POLICY_VERSION})")
        name = top.text("name", max_len=MAX_NAME) if top.has("name") else None
        if name is not None and not name.strip():
            raise self.fail("name", "must be a non-empty string")
        rules = {t: self.rules(t, data[t]) for t in EVIDENCE_TYPES if t in data}
        if top.has("types"):
            types = top.strings("types", max_items=MAX_ITEMS)
            for t in types:
                if t not in EVIDENCE_TYPES:
                    raise self.fail("types", f"unknown evidence type {t!r}", f"known: {', '.join(EVIDENCE_TYPES)}")
            accepted = frozenset(types)
        else:
            accepted = frozenset(rules) if rules else frozenset(DEFAULT_TYPES)
        # The id identifies the trust anchors themselves: certificates count by their DER bytes,
        # however the policy named them (inline PEM or a file, which may change).
        identity = _canonical(data)
        for kind, parsed in rules.items():
            for key in ("ek_ca", "ak_ca", "roots"):
                if key in identity[kind]:
                    identity[kind][key] = [der.hex() for der in getattr(parsed, key)]
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
        return Policy(
            types=accepted,
            rules=rules,
            freshness=self.freshness(data.get("freshness", {})),
            name=name,
            digest=hashlib.sha256(canonical).hexdigest(),
        )

    def freshness(self, data: object) -> Freshness:
        fields = self.table(data, "freshness", ("nonce", "max_age"))
        nonce = fields.text("nonce", ("required", "optional"), default="optional")
        max_age = fields.duration("max_age") if fields.has("max_age") else None
        return Freshness(nonce_required=nonce == "required", max_age=max_age)

    def rules(self, kind: str, data: object) -> Rules:
        fields = self.table(data, kind, ALLOWED_KEYS[kind], unknown=f"not a setting for {kind} evidence")
        out: dict[str, Any] = {}
        if fields.has("measurements"):
            out["measurements"] = fields.hex_list("measurements", max_items=MAX_ITEMS)
        if fields.has("signers"):
            out["signers"] = tuple(
                self.signer(v, f"{kind}.signers[{i}]")
                for i, v in enumerate(fields.list("signers", max_items=MAX_ITEMS))
            )
        for key in ("debug", "self_certified"):
            if fields.has(key):
                out[key] = fields.boolean(key)
        if fields.has("tcb_statuses"):
            statuses = fields.strings("tcb_statuses", max_items=MAX_ITEMS)
            for s in statuses:
                if s not in TCB_STATUSES:
                    raise self.fail(
                        f"{kind}.tcb_statuses", f"unknown TCB status {s!r}", f"known: {', '.join(TCB_STATUSES)}"
                    )
            out["tcb_statuses"] = statuses
        for key in ("backends", "isolation"):
            if fields.has(key):
                out[key] = fields.strings(key, max_items=MAX_ITEMS)
        for key in ("platform_keys", "runtime_hashes", "ek_certificates", "launch_measurements"):
            if fields.has(key):
                out[key] = fields.hex_list(key, 32, max_items=MAX_ITEMS)
        if fields.has("ak_names"):
            out["ak_names"] = fields.hex_list("ak_names", max_items=MAX_ITEMS)
        if fields.has("pcrs"):
            out["pcrs"] = self.pcrs(fields.map["pcrs"], f"{kind}.pcrs")
        for key in ("ek_ca", "ak_ca", "roots"):
            if fields.has(key):
                out[key] = self.certificates(fields, key)
        if fields.has("min_tcb"):
            out["min_tcb"] = self.min_tcb(fields.map["min_tcb"], f"{kind}.min_tcb")
        if fields.has("rtmrs"):
            out["rtmrs"] = self.indexed_hex(fields.map["rtmrs"], f"{kind}.rtmrs", 4, 48)
        if fields.has("max_platform_age"):
            out["max_platform_age"] = fields.duration("max_platform_age")
        if fields.has("init_data_digests"):
            key = f"{kind}.init_data_digests"
            out["init_data_digests"] = fields.hex_list("init_data_digests", max_items=MAX_ITEMS)
            for i, digest in enumerate(out["init_data_digests"]):
                if len(digest) not in (32, 48, 64):
                    raise self.fail(
                        f"{key}[{i}]", "must be a SHA-256, SHA-384 or SHA-512 digest (64, 96 or 128 hex digits)"
                    )
        if fields.has("init_data"):
            out["init_data"] = self.init_data(fields.map["init_data"], f"{kind}.init_data")
        return Rules(**out)

    # the policy language's own tables

    def signer(self, value: object, key: str) -> SignerRule:
        if not isinstance(value, Mapping):
            raise self.fail(key, "must be a table with signer, and optionally product_id and min_svn")
        fields = self.table(value, key, ("signer", "product_id", "min_svn"))
        if not fields.has("signer"):
            raise self.fail(key, "names no signer")
        return SignerRule(
            signer=fields.hex("signer"),
            product_id=fields.uint("product_id") if fields.has("product_id") else None,
            min_svn=fields.integer("min_svn", 0, 2**64 - 1, default=0),
        )

    def indexed_hex(self, value: object, key: str, count: int, size: int | None) -> dict[int, bytes]:
        if not isinstance(value, Mapping):
            raise self.fail(key, 'must be a table of index = "hex"')
        fields = self.table(value, key, None)
        out = {}
        for k in value:
            try:
                idx = int(k)
            except (TypeError, ValueError):
                raise self.fail(f"{key}.{k}", "index must be a number") from None
            if not 0 <= idx < count:
                raise self.fail(f"{key}.{k}", f"index must be from 0 to {count - 1}")
            out[idx] = fields.hex(str(k), size)
        return out

    def pcrs(self, value: object, key: str) -> dict[str, dict[int, bytes]]:
        sizes = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
        if not isinstance(value, Mapping):
            raise self.fail(key, "must be a table of banks, e.g. [cove.pcrs.sha256]")
        out = {}
        for bank, values in value.items():
            if bank not in sizes:
                raise self.fail(f"{key}.{bank}", "unknown PCR bank", f"known: {', '.join(sizes)}")
            out[bank] = self.indexed_hex(values, f"{key}.{bank}", 24, sizes[bank])
        return out

    def init_data(self, value: object, key: str) -> dict[str, tuple[Any, ...]]:
        """Keys of the init-data ``data`` table, each with the list of values accepted for it."""
        if not isinstance(value, Mapping) or not value:
            raise self.fail(key, 'must be a table of data key = [accepted values], e.g. "policy.rego" = ["..."]')
        fields = self.table(value, key, None)
        out = {}
        for name in value:
            items = fields.list(str(name), max_items=MAX_ITEMS)
            if not items:
                raise self.fail(f"{key}.{name}", "lists no accepted value (which would deny every init-data)")
            out[str(name)] = tuple(_canonical(v) for v in items)
        return out

    def min_tcb(self, value: object, key: str) -> dict[str, int]:
        if not isinstance(value, Mapping):
            raise self.fail(key, "must be a table like {bootloader = 3, tee = 0, snp = 8, microcode = 115}")
        fields = self.table(value, key, SNP_TCB_PARTS, unknown="unknown TCB component")
        return {str(part): fields.integer(str(part), 0, 255) for part in value}

    def certificates(self, fields: Settings, field_key: str) -> tuple[bytes, ...]:
        """PEM text or paths (relative to the policy file) of certificates, as DER."""
        key = fields.name(field_key)
        if isinstance(fields.map[field_key], str):
            items: tuple[str, ...] = (fields.text(field_key, max_len=MAX_FILE),)
        else:
            items = fields.strings(field_key, max_items=MAX_ITEMS, max_len=MAX_FILE)
        out: list[bytes] = []
        for item in items:
            if "-----BEGIN" in item:
                pem = item.encode()
            elif not self.allow_paths:
                raise self.fail(
                    key,
                    f"{item[:60]!r} is a file name; this policy must carry its certificates inline",
                    "paste the PEM text of each certificate into the policy",
                )
            else:
                path = Path(item)
                if not path.is_absolute() and self.base is not None:
                    path = self.base / path
                try:
                    read = _read_bounded(path)
                except OSError as exc:
                    raise self.fail(key, f"cannot read certificate file {item}: {exc.strerror or exc}") from None
                if read is None:
                    raise self.fail(key, f"certificate file {item} is larger than {MAX_FILE >> 20} MiB")
                pem = read
            try:
                certs = x509.load_pem_x509_certificates(pem)
            except ValueError as exc:
                raise self.fail(key, f"{item[:40]!r} is not a PEM certificate ({exc})") from None
            out.extend(c.public_bytes(serialization.Encoding.DER) for c in certs)
        if not out:
            raise self.fail(key, "names no certificate")
        return tuple(out)


MAX_ITEMS = 1 << 16  # entries of one list in a policy: far more reference values than any deployment has
MAX_NAME = 4096


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value
