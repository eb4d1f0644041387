"""Fetching verification collateral: Intel PCS/PCCS for DCAP quotes, AMD KDS for SEV-SNP VCEKs.

Collateral is public and signed (the verifier checks every signature and
validity window), so it may come over plain HTTP from any mirror; what
matters is that trust anchors never do. Responses are cached on disk by URL
for ``ttl`` seconds and reused when the service is unreachable; the verifier
still refuses collateral whose window has passed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cove.attest.errors import VerificationError
from cove.decode import Fields, decode_json
from cove.util import write_atomic

INTEL_ROOT_CRL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
SNP_PRODUCTS = ("Milan", "Genoa", "Turin")
CACHE_LIMIT = 16 << 20  # a cached response in base64: PCS answers are tens of kilobytes, CRLs less


def _cached(path: Path) -> tuple[float, bytes, dict[str, str]] | None:
    """A cache entry (fetched, body, headers); missing, unreadable or damaged is a miss, fetched again."""
    what = f"collateral cache entry {path.name}"
    try:
        entry = Fields(
            decode_json(path.read_bytes(), VerificationError, what, limit=CACHE_LIMIT), what, VerificationError
        )
        fetched = entry.value("fetched", (int, float))
        headers = entry.sub("headers")
        names = [name for name in headers.map if isinstance(name, str)]
        if len(names) != len(headers.map):
            return None
        found = {name: headers.text(name, max_len=CACHE_LIMIT) for name in names}
        body = base64.b64decode(entry.text("body", max_len=CACHE_LIMIT), validate=True)
    except (OSError, VerificationError, binascii.Error):
        return None
    assert isinstance(fetched, (int, float))  # Fields.value checked it
    return float(fetched), body, found


def _signature(response: bytes, kind: str) -> str:
    """The ``signature`` member of a PCS TCB info or QE identity response (hex text)."""

    def lacking(problem: str) -> VerificationError:
        return VerificationError(f"{kind}: collateral responses lack their signatures")

    return Fields(decode_json(response, lacking, "a collateral response"), "it", lacking).text(
        "signature", max_len=4096
    )


def default_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cove" / "collateral"


def raw_member(text: str, key: str) -> str:
    """The exact JSON text of object member ``key`` (signatures cover these bytes, not a re-encoding)."""
    marker = f'"{key}"'
    start = text.find(marker)
    if start < 0:
        raise VerificationError(f"collateral: response has no {key}")
    i = text.index(":", start + len(marker)) + 1
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    if i >= len(text) or text[i] != "{":
        raise VerificationError(f"collateral: {key} is not an object")
    depth, in_string, escaped = 0, False, False
    for j in range(i, len(text)):
        c = text[j]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i : j + 1]
    raise VerificationError(f"collateral: {key} is truncated")


def _crl_der(body: bytes) -> bytes:
    stripped = body.strip()
    if stripped.startswith(b"-----BEGIN"):
        return x509.load_pem_x509_crl(stripped).public_bytes(serialization.Encoding.DER)
    try:
        return bytes.fromhex(stripped.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return body


class Fetcher:
    """Fetches (and caches) collateral from a PCCS/PCS base URL and an AMD KDS base URL."""

    def __init__(
        self,
        pccs: str | None = None,
        kds: str | None = None,
        cache_dir: Path | None = None,
        ttl: float = 86400,
        timeout: float = 30,
    ):
        self.pccs = pccs.rstrip("/") if pccs else None
        self.kds = kds.rstrip("/") if kds else None
        self.cache = Path(cache_dir) if cache_dir else default_cache_dir()
        self.ttl = ttl
        self.timeout = timeout

    # -- HTTP with a cache

    def get(self, url: str) -> tuple[bytes, dict[str, str]]:
        """(body, headers) of a 200 response, from the cache while fresh or when the network fails."""
        path = self.cache / (hashlib.sha256(url.encode()).hexdigest() + ".json")
        cached = _cached(path)
        if cached and time.time() - cached[0] < self.ttl:
            return cached[1], cached[2]
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                body = response.read()
                headers = {k.lower(): v for k, v in response.headers.items()}
        except urllib.error.HTTPError as exc:
            raise VerificationError(f"collateral: {url} answered {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            if cached:
                return cached[1], cached[2]
            reason = getattr(exc, "reason", exc)
            raise VerificationError(f"collateral: cannot reach {url}: {reason}") from None
        self.cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(
            path,
            json.dumps(
                {"url": url, "fetched": time.time(), "headers": headers, "body": base64.b64encode(body).decode()}
            ).encode(),
            mode=0o600,
        )
        return body, headers

    @staticmethod
    def _chain(headers: dict[str, str], *names: str) -> str:
        for name in names:
            if name.lower() in headers:
                return urllib.parse.unquote(headers[name.lower()])
        raise VerificationError(f"collateral: response lacks the {names[0]} header")

    # -- DCAP

    def dcap(self, kind: str, quote: bytes) -> dict[str, Any]:
        """PCS-shaped collateral for an SGX or TDX quote."""
        from cove.attest._x509 import load_pem_chain
        from cove.attest.dcap_quote import parse_dcap_quote
        from cove.attest.pck import parse_pck_extension

        if self.pccs is None:
            raise VerificationError(f"{kind}: no collateral given", "pass --collateral FILE or --pccs URL")
        parsed = parse_dcap_quote(quote)
        chain = load_pem_chain(parsed.cert.pck_chain_pem, kind, "PCK certificate chain")
        fmspc = parse_pck_extension(chain[0], kind).fmspc.hex()
        ca = "platform" if "Platform" in chain[0].issuer.rfc4514_string() else "processor"
        tee = "tdx" if parsed.is_tdx else "sgx"
        crl, crl_headers = self.get(f"{self.pccs}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der")
        tcb, tcb_headers = self.get(f"{self.pccs}/{tee}/certification/v4/tcb?fmspc={fmspc}")
        qe, qe_headers = self.get(f"{self.pccs}/{tee}/certification/v4/qe/identity")
        try:
            root_crl, _ = self.get(f"{self.pccs}/sgx/certification/v4/rootcacrl")
        except VerificationError:
            root_crl, _ = self.get(INTEL_ROOT_CRL)
        tcb_sig, qe_sig = _signature(tcb, kind), _signature(qe, kind)
        tcb_text, qe_text = tcb.decode(), qe.decode()  # UTF-8: decode_json checked it
        return {
            "tcb_info": raw_member(tcb_text, "tcbInfo"),
            "tcb_info_signature": tcb_sig,
            "tcb_info_issuer_chain": self._chain(tcb_headers, "TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"),
            "qe_identity": raw_member(qe_text, "enclaveIdentity"),
            "qe_identity_signature": qe_sig,
            "qe_identity_issuer_chain": self._chain(
                qe_headers, "SGX-Enclave-Identity-Issuer-Chain", "Enclave-Identity-Issuer-Chain"
            ),
            "pck_crl_issuer_chain": self._chain(crl_headers, "SGX-PCK-CRL-Issuer-Chain"),
            "pck_crl": _crl_der(crl).hex(),
            "root_ca_crl": _crl_der(root_crl).hex(),
        }

    # -- SEV-SNP

    def vcek(self, report: bytes) -> bytes:
        """The VCEK (DER) for a report's chip and reported TCB, from the KDS."""
        from cove.attest.snp_report import parse_snp_report

        if self.kds is None:
            raise VerificationError("snp: no VCEK given", "pass --vcek FILE or --kds URL")
        last: VerificationError | None = None
        for product in SNP_PRODUCTS:
            r = parse_snp_report(report, product)
            if r.signing_key != "vcek":
                raise VerificationError("snp: the report is not signed by a VCEK; give the VLEK with --vcek")
            t = r.reported_tcb
            hwid = r.chip_id[:8] if product == "Turin" else r.chip_id
            query = f"blSPL={t.bootloader}&teeSPL={t.tee}&snpSPL={t.snp}&ucodeSPL={t.microcode}"
            if product == "Turin":
                query = f"fmcSPL={t.fmc}&" + query
            try:
                return self.get(f"{self.kds}/vcek/v1/{product}/{hwid.hex()}?{query}")[0]
            except VerificationError as exc:
                last = exc
        assert last is not None  # SNP_PRODUCTS is not empty
        raise last

    def inputs_for(self, kind: str, evidence: bytes) -> dict[str, Any]:
        """Fields of verifier.Inputs to fill in for ``kind``."""
        if kind in ("sgx", "tdx"):
            return {"collateral": self.dcap(kind, evidence)}
        if kind == "snp":
            return {"vcek": self.vcek(evidence)}
        return {}
