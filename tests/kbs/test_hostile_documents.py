"""Every document the broker and its client decode, fed hostile bytes: one clear refusal of the layer's
error type, never a RecursionError, an AttributeError or a wrong shape accepted (cove.decode)."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from joserfc import jwk

from cove.errors import CoveError
from cove.kbs import client, coco_evidence, evidence_appraisal, jose
from cove.kbs.coco_collateral import CollateralSource
from cove.kbs.problems import Problem
from tests.kbs.conftest import ssl_for
from tests.kbs.test_vectors import VECTORS

DEEP = "[" * 100_000  # past the interpreter's recursion limit: json and tomllib raised RecursionError
HOSTILE_JSON = {
    "deep nesting": DEEP,
    "trailing garbage": '{"a": 1} trailing',
    "wrong top-level type": "[1, 2]",
    "wrong field type": '{"alg": 5, "enc": []}',
}


def b64e(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode("ascii")


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text and len(text) < 400, text
    return text


@pytest.mark.parametrize("case", HOSTILE_JSON)
def test_tee_evidence_strings(case):
    """tee-evidence and primary_evidence sent as JSON strings (coco_evidence and evidence_appraisal)."""
    text = HOSTILE_JSON[case]
    for call in (
        lambda: coco_evidence.unpack("sample", text),
        lambda: coco_evidence.unpack("sample", {"primary_evidence": text, "additional_evidence": ""}),
        lambda: evidence_appraisal.appraise("sample", text, {}, None, None),  # refused before anchors are used
        lambda: evidence_appraisal.appraise("sample", {"primary_evidence": text}, {}, None, None),
    ):
        if case == "wrong field type":  # a map: its fields are the adapter's and verifier's to refuse
            continue
        with pytest.raises(Problem) as refused:
            call()
        assert refused.value.kind == "EvidenceInvalid"
        one_line(refused.value)


@pytest.mark.parametrize("case", HOSTILE_JSON)
def test_additional_evidence(case):
    with pytest.raises(Problem) as refused:
        coco_evidence.check_additional(HOSTILE_JSON[case])
    assert refused.value.kind == "EvidenceInvalid"
    one_line(refused.value)


@pytest.mark.parametrize(
    "body, words",
    [
        ("a = " + "[" * 8000 + "]" * 8000, "init-data is not valid TOML"),  # deep nesting
        ('algorithm = "sha256"\nversion = "0.1.0"\n] trailing', "init-data is not valid TOML"),
        (5, "init-data must be"),  # wrong top-level type
        ('algorithm = "sha256"\nversion = "0.1.0"\ndata = 1', "init-data data must be a table"),  # wrong field type
    ],
    ids=["deep nesting", "trailing garbage", "wrong top-level type", "wrong field type"],
)
def test_init_data(body, words):
    with pytest.raises(Problem) as refused:
        coco_evidence.init_data({"format": "toml", "body": body})
    assert refused.value.kind == "InvalidRequest" and words in one_line(refused.value)


@pytest.mark.parametrize(
    "content, words",
    [
        (DEEP, "is not valid JSON"),
        ('{"tcb_info": "{}"} trailing', "is not valid JSON"),
        ("[1]", "is not a collateral object"),
        ('{"tcb_info": 5, "qe_identity": [], "pck_crl": 1}', "the collateral does not parse"),
    ],
    ids=["deep nesting", "trailing garbage", "wrong top-level type", "wrong field type"],
)
def test_collateral_import(tmp_path: Path, content, words):
    source = tmp_path / "collateral.json"
    source.write_text(content)
    with pytest.raises(CoveError) as refused:
        CollateralSource(tmp_path / "store").import_file("tdx", source)
    assert words in one_line(refused.value)
    assert not (tmp_path / "store").exists()  # nothing half-written


@pytest.mark.parametrize(
    "content, kind",
    [
        (DEEP, "Unavailable"),
        ('{"tcb_info": "{}"} trailing', "Unavailable"),
        ("[1]", "EvidenceInvalid"),  # not collateral: as if absent ("the broker has no collateral")
        ('{"tcb_info": 5}', None),  # a map is handed to the verifier, which refuses its fields
    ],
    ids=["deep nesting", "trailing garbage", "wrong top-level type", "wrong field type"],
)
def test_collateral_folder(tmp_path: Path, content, kind):
    source = CollateralSource(tmp_path)
    quote = (VECTORS / "tdx" / "quote.bin").read_bytes()
    source.path("tdx", "b0c06f000000").write_text(content)
    if kind is None:
        assert source.collateral_for("tdx", quote) == {"tcb_info": 5}
        return
    with pytest.raises(Problem) as refused:
        source.collateral_for("tdx", quote)
    assert refused.value.kind == kind
    one_line(refused.value)


@pytest.mark.parametrize("case", HOSTILE_JSON)
def test_jwe_protected_header(case):
    key = jwk.generate_key("EC", "P-256")
    document = dict(jose.encrypt_to(jose.public_jwk(key), b"value"), protected=b64e(HOSTILE_JSON[case]))
    with pytest.raises(ValueError) as refused:
        jose.decrypt_from(document, key)
    one_line(refused.value)


class HostileBroker(BaseHTTPRequestHandler):
    """A broker on loopback that answers auth with a nonce and attest with ``token``, whatever that is."""

    token = ""

    def do_POST(self) -> None:  # noqa: N802 - the standard library's name
        self.rfile.read(int(self.headers.get("content-length") or 0))
        answer = {"nonce": b64e("nonce")} if self.path == "/kbs/v0/auth" else {"token": type(self).token}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the standard library's name
        pass


@pytest.fixture(scope="module")
def hostile_broker() -> Iterator[str]:
    listener = ThreadingHTTPServer(("127.0.0.1", 0), HostileBroker)
    threading.Thread(target=listener.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.server_address[1]}"
    finally:
        listener.shutdown()
        listener.server_close()


@pytest.mark.parametrize("case", [*HOSTILE_JSON, "scalar"])
def test_attestation_token_claims(hostile_broker, case):
    """The claims of the token a broker answers attest with, as the client reads them (KbsClient.attest)."""
    claims = '"a string"' if case == "scalar" else HOSTILE_JSON[case]
    HostileBroker.token = f"h.{b64e(claims)}.s"
    with client.KbsClient(hostile_broker) as kbs_client:
        if case == "wrong field type":  # a map: the client reads its fields where it uses them
            assert kbs_client.attest(client.SampleEvidence()) == HostileBroker.token
            assert kbs_client.claims == json.loads(claims)
            return
        with pytest.raises(CoveError) as refused:
            kbs_client.attest(client.SampleEvidence())
        assert "the broker's attestation token is not a JWT" in one_line(refused.value)
        assert kbs_client.claims is None


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_request_bodies_over_http(kbs):
    """The auth and attest bodies (the broker reads their fields): an InvalidRequest problem of one line, answered
    401 on these paths (docs/kbs.md: the CoCo client re-runs its handshake on a 401)."""
    with httpx.Client(base_url=kbs.url, verify=ssl_for(kbs)) as http:
        for endpoint in ("/kbs/v0/auth", "/kbs/v0/attest"):  # attest: refused before any session is looked up
            # nested past the interpreter's recursion limit, yet under auth's body limit (16 KiB), so the parser sees it
            for case, body in (("deep nesting", "[" * 10_000), ("trailing garbage", HOSTILE_JSON["trailing garbage"])):
                reply = http.post(endpoint, content=body, headers={"content-type": "application/json"})
                assert reply.status_code == 401 and reply.json()["type"].endswith(":InvalidRequest"), reply.text
                assert one_line(reply.json()["detail"]).startswith("body: "), (endpoint, case, reply.text)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_admin_bodies_over_http(kbs):
    """The admin bodies are FastAPI's to decode (pydantic models): hostile JSON is a 400 InvalidRequest problem."""
    admin = kbs.admin
    for body in (DEEP.encode(), b'{"name": "x"} trailing', b"[1, 2]", b'{"name": 5, "jwk": []}'):
        headers = {**admin._headers(), "content-type": "application/json"}  # a fresh token per request
        reply = admin.http.request("POST", "/kbs/v0/admin/keys", content=body, headers=headers)
        assert reply.status_code == 400 and reply.json()["type"].endswith(":InvalidRequest"), reply.text
