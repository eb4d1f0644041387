"""Collateral from a PCS/PCCS and an AMD KDS over real HTTP (a loopback server fed from the vectors), cached."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cove.attest.collateral_fetch import Fetcher, raw_member
from cove.attest.errors import VerificationError
from tests.attest.attest_vectors import VECTORS

SGX_T = "2025-06-19T12:56:11Z"
TDX_T = "2025-06-19T12:16:03Z"


def pcs_routes() -> dict[str, tuple[bytes, dict[str, str]]]:
    """What an Intel PCS (v4 API) answers for the vectors' platforms, rebuilt from the collateral files."""
    routes = {}
    for tee in ("sgx", "tdx"):
        c = json.loads((VECTORS / tee / "collateral.json").read_text())
        fmspc = json.loads(c["tcb_info"])["fmspc"].lower()
        quote = lambda chain: {"X-Chain": urllib.parse.quote(chain)}  # noqa: E731
        routes[f"/{tee}/certification/v4/tcb?fmspc={fmspc}"] = (
            ('{"tcbInfo":' + c["tcb_info"] + ',"signature":"' + c["tcb_info_signature"] + '"}').encode(),
            {"TCB-Info-Issuer-Chain": quote(c["tcb_info_issuer_chain"])["X-Chain"]},
        )
        routes[f"/{tee}/certification/v4/qe/identity"] = (
            ('{"enclaveIdentity":' + c["qe_identity"] + ',"signature":"' + c["qe_identity_signature"] + '"}').encode(),
            {"SGX-Enclave-Identity-Issuer-Chain": quote(c["qe_identity_issuer_chain"])["X-Chain"]},
        )
        for ca in ("processor", "platform"):
            routes[f"/{tee}-pckcrl-{ca}"] = (
                bytes.fromhex(c["pck_crl"]),
                {"SGX-PCK-CRL-Issuer-Chain": quote(c["pck_crl_issuer_chain"])["X-Chain"]},
            )
        routes[f"/{tee}-rootcacrl"] = (c["root_ca_crl"].encode(), {})
    return routes


class Service:
    """A PCS + KDS on loopback; ``tee`` picks which vector's CRLs to serve (they differ per platform)."""

    def __init__(self, tee: str):
        routes = pcs_routes()
        vcek = (VECTORS / "snp/vcek.der").read_bytes()
        self.hits: list[str] = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                service.hits.append(self.path)
                body, headers = None, {}
                if self.path.startswith("/sgx/certification/v4/pckcrl?ca="):
                    ca = self.path.split("ca=")[1].split("&")[0]
                    body, headers = routes[f"/{tee}-pckcrl-{ca}"]
                elif self.path == "/sgx/certification/v4/rootcacrl":
                    body, headers = routes[f"/{tee}-rootcacrl"]
                elif self.path in routes:
                    body, headers = routes[self.path]
                elif self.path.startswith("/vcek/v1/Milan/") and "blSPL=2&teeSPL=0&snpSPL=5&ucodeSPL=68" in self.path:
                    body = vcek
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def service():
    made = []

    def start(tee: str) -> Service:
        s = Service(tee)
        made.append(s)
        return s

    yield start
    for s in made:
        s.stop()


@pytest.mark.parametrize("tee, at", [("sgx", SGX_T), ("tdx", TDX_T)])
def test_dcap_collateral_from_pccs_then_cache(cove, service, tmp_path, tee, at):
    s = service(tee)
    cache = tmp_path / "cache"
    policy = tmp_path / "p.toml"
    policy.write_text(f'[{tee}]\ntcb_statuses = ["UpToDate", "ConfigurationAndSWHardeningNeeded"]\n')
    args = ["verify", VECTORS / f"{tee}/quote.bin", "--pccs", s.url, "--cache", cache, "--time", at, "--policy", policy]
    cove.ok(*args)
    assert len(s.hits) == 4
    s.stop()
    cove.ok(*args)  # the service is gone: the cache answers
    assert len(s.hits) == 4


def test_snp_vcek_from_kds(cove, service, tmp_path):
    s = service("sgx")
    policy = tmp_path / "p.toml"
    policy.write_text("[snp]\ndebug = true\n")
    cove.ok(
        "verify",
        VECTORS / "snp/report.bin",
        "--kds",
        s.url,
        "--cache",
        tmp_path / "c",
        "--time",
        "2026-01-01T00:00:00Z",
        "--policy",
        policy,
    )
    assert s.hits[0].startswith("/vcek/v1/Milan/") and "blSPL=2" in s.hits[0]


def test_unreachable_service_is_one_line(cove, tmp_path):
    result = cove("verify", VECTORS / "sgx/quote.bin", "--pccs", "http://127.0.0.1:9", "--cache", tmp_path / "c")
    assert result.returncode == 5 and "collateral: cannot reach http://127.0.0.1:9" in result.stderr


def test_missing_route_is_a_verification_error(service, tmp_path):
    s = service("sgx")
    fetcher = Fetcher(pccs=s.url + "/nothing", cache_dir=tmp_path)
    with pytest.raises(VerificationError, match="answered 404"):
        fetcher.dcap("sgx", (VECTORS / "sgx/quote.bin").read_bytes())


def test_raw_member_keeps_the_signed_bytes():
    text = '{"tcbInfo": {"a": "x}\\"{", "b": [1, {"c": 2}]} , "signature": "00"}'
    assert raw_member(text, "tcbInfo") == '{"a": "x}\\"{", "b": [1, {"c": 2}]}'
    with pytest.raises(VerificationError, match="truncated"):
        raw_member('{"tcbInfo": {"a": 1', "tcbInfo")
    with pytest.raises(VerificationError, match="no enclaveIdentity"):
        raw_member(text, "enclaveIdentity")


def _entry(url: str, body: object, headers: object = None, fetched: object = None) -> bytes:
    """A cache entry as Fetcher.get writes it, with any field replaced."""
    return json.dumps(
        {
            "url": url,
            "fetched": time.time() if fetched is None else fetched,
            "headers": {} if headers is None else headers,
            "body": base64.b64encode(body).decode() if isinstance(body, bytes) else body,
        }
    ).encode()


def _cache_path(cache, url: str):
    return cache / (hashlib.sha256(url.encode()).hexdigest() + ".json")


HOSTILE_CACHE = {
    "deep nesting": lambda url: b"[" * 10_000 + b"]" * 10_000,  # was a RecursionError
    "trailing garbage": lambda url: _entry(url, b"cached") + b" {}",
    "wrong top-level type": lambda url: json.dumps([url]).encode(),  # was an AttributeError
    "wrong field type": lambda url: _entry(url, 5),  # was a TypeError from b64decode
    "headers not a map": lambda url: _entry(url, b"cached", headers=["x"]),  # was returned as the headers
    "body not base64": lambda url: _entry(url, "not base64!"),  # was a binascii.Error
}


@pytest.mark.parametrize("case", HOSTILE_CACHE)
def test_a_damaged_cache_entry_is_a_miss(service, tmp_path, case):
    """The cache is read through cove.decode: a damaged entry is fetched again, and without a network one line."""
    s = service("sgx")
    url = s.url + "/sgx/certification/v4/qe/identity"
    _cache_path(tmp_path, url).write_bytes(HOSTILE_CACHE[case](url))
    body, _ = Fetcher(cache_dir=tmp_path).get(url)
    assert body.startswith(b'{"enclaveIdentity":') and len(s.hits) == 1
    gone = "http://127.0.0.1:9/qe"
    _cache_path(tmp_path, gone).write_bytes(HOSTILE_CACHE[case](gone))
    with pytest.raises(VerificationError, match="cannot reach"):
        Fetcher(cache_dir=tmp_path).get(gone)


HOSTILE_RESPONSES = {
    "deep nesting": b"[" * 10_000 + b"]" * 10_000,  # was a RecursionError
    "trailing garbage": b'{"tcbInfo": {}, "signature": "00"} {}',
    "wrong top-level type": b'["tcbInfo", "signature"]',
    "wrong field type": b'{"tcbInfo": {}, "signature": 5}',  # was passed on as the signature
    "not UTF-8": b'{"tcbInfo": {}, "signature": "\xff"}',  # was a UnicodeDecodeError
}


@pytest.mark.parametrize("case", HOSTILE_RESPONSES)
def test_a_hostile_pcs_response_is_one_verification_error(service, tmp_path, case):
    """A TCB info response (here from a fresh cache entry; the rest from the service) is checked as it is read."""
    s = service("sgx")
    tcb = next(path for path in pcs_routes() if path.startswith("/sgx/certification/v4/tcb?"))
    _cache_path(tmp_path, s.url + tcb).write_bytes(_entry(s.url + tcb, HOSTILE_RESPONSES[case]))
    with pytest.raises(VerificationError, match="collateral responses lack their signatures"):
        Fetcher(pccs=s.url, cache_dir=tmp_path).dcap("sgx", (VECTORS / "sgx/quote.bin").read_bytes())
