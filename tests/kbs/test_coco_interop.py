"""Cove's broker against a byte-for-byte stand-in of the Confidential Containers KBS client.

One broker (SQLite, HTTPS on loopback) serves every test here; the client is
tests/kbs/coco_client.py, whose behaviours are pinned to guest-components,
kbs-types and Trustee sources by commit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
import rfc8785

from cove.kbs.coco_collateral import CollateralSource
from cove.kbs.coco_evidence import replay_rtmrs
from cove.kbs.problems import TYPE_PREFIX, Problem
from tests.kbs import coco_client as coco
from tests.kbs.conftest import ssl_for, start_kbs, stop_kbs
from tests.kbs.test_tpm_rooted import CLAIMS, PlatformEvidence, tpm_policy
from tests.kbs.test_vectors import SGX_TIME, SNP_TIME, TDX_TIME, VECTORS, anchors, vector
from tests.platform.conftest import TpmPlatforms

TRUSTEE_TPM = Path(__file__).parent / "coco_fixtures" / "trustee_tpm_evidence.json"  # trustee @ 45e7c3a2
ALGORITHMS = ["ECDH-ES+A256KW-P256", "ECDH-ES+A256KW-P384", "ECDH-ES+A256KW-P521", "RSA-OAEP-256"]
EVIDENCE_TIME: dict = {}  # {"tee": vector}: the broker checks evidence at that vector's time
VLEK_TIME = datetime(2025, 6, 1, tzinfo=timezone.utc)  # inside the VLEK's validity (tests/data/vectors/README.md)


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    """A Cove platform on a real swtpm: Cove evidence, and TPM quotes in the CoCo attester's shape."""
    platforms = TpmPlatforms(tmp_path_factory.mktemp("tpm"))
    yield platforms.make("a")
    platforms.stop_all()


@pytest.fixture(scope="module")
def broker(tmp_path_factory, tls_files, platform):
    """One broker for the module: sample, sgx, tdx, tpm and TPM-rooted cove evidence; the vectors'
    collateral imported; hardware vectors checked at their times; the swtpm's AK and the AK of
    Trustee's TPM fixture trusted."""
    tmp = tmp_path_factory.mktemp("coco")
    source = CollateralSource(tmp / "collateral")
    for tee in ("sgx", "tdx"):
        source.import_file(tee, VECTORS / tee / "collateral.json")
    when = {"sgx": SGX_TIME, "tdx": TDX_TIME, "snp": SNP_TIME, "snp-vlek": VLEK_TIME}
    trustee_ak = base64.b64decode(json.loads(TRUSTEE_TPM.read_bytes())["ak_public"])
    trusted = replace(
        anchors(),
        tpm_aks=[platform.ak_public.read_bytes(), trustee_ak],
        snp_ask_ark=[vector("snp/milan_ask_ark_asvk.pem")],
    )  # VCEKs and VLEKs
    policy = tpm_policy([platform]).replace('types = ["cove"]', 'types = ["sample", "sgx", "tdx", "tpm", "cove"]')
    running = start_kbs(
        f"sqlite:///{tmp / 'kbs.db'}",
        tmp,
        True,
        tls_files,
        policy=policy,
        anchors=trusted,
        collateral_dir=str(tmp / "collateral"),
        evidence_time=lambda: when.get(EVIDENCE_TIME.get("tee"), datetime.now(timezone.utc)),
    )
    yield running
    stop_kbs(running)


def put_secret(broker, value: bytes, policy: str = 'types = ["sample"]\n') -> str:
    name = "p-" + uuid.uuid4().hex[:8]
    broker.admin.put_policy(name, policy)
    path = f"default/key/{uuid.uuid4().hex[:12]}"
    broker.admin.create_secret(path, "data", name, value=value)
    return path


@pytest.fixture
def client(broker):
    made: list[coco.CocoClient] = []

    def make(attester=None, **kwargs) -> coco.CocoClient:
        kwargs.setdefault("sleep", lambda seconds: None)
        one = coco.CocoClient(broker.url, attester or coco.SampleAttester(), verify=ssl_for(broker), **kwargs)
        made.append(one)
        return one

    yield make
    for one in made:
        one.close()


def steps(client: coco.CocoClient) -> list[tuple[str, str, int]]:
    return [(e.method, e.path.split("/")[0], e.status) for e in client.log]


# -- the client's own fixtures and rules, before any broker ------------------------------------------
def test_client_reproduces_its_sources_fixtures():
    # kbs-types 0.18 src/lib.rs tests protected_header_generate_aad and parse_response_nested_protected_header
    assert (
        coco.protected_header_aad({"alg": "fakealg", "enc": "fakeenc"}, True)
        == b"eyJhbGciOiJmYWtlYWxnIiwiZW5jIjoiZmFrZWVuYyJ9"
    )
    nested = json.loads(
        coco.b64url_decode(
            "eyJhbGciOiJmYWtlYWxnIiwiZW5jIjoiZmFrZWVuYyIsImVwayI6eyJrdHkiOiJPS1AiLCJjcnYiOiJYMjU1MTkiLCJ4IjoiaFNEd0NZa3dw"
            "MVIwaTMzY3RENzNXZzJfT2cwbU9CcjA2NlNwanFxYlRtbyJ9fQo"
        )
    )
    as_sorted = json.loads(coco.b64url_decode(coco.protected_header_aad(nested, True).decode()))
    as_received = json.loads(coco.b64url_decode(coco.protected_header_aad(nested, False).decode()))
    assert list(as_sorted["epk"]) == ["crv", "kty", "x"] and list(as_received["epk"]) == ["kty", "crv", "x"]
    # guest-components rcar_client.rs test_get_hash_algorithm cases
    assert coco.CocoClient.hash_algorithm({}) == "sha384" and coco.CocoClient.hash_algorithm("") == "sha384"
    for name, expected in (("sha256", "sha256"), ("SHA384", "sha384"), ("SHA512", "sha512")):
        assert coco.CocoClient.hash_algorithm({"selected-hash-algorithm": name}) == expected
    for bad, variant in (
        ("", "InvalidHashAlgorithm"),
        ("foo", "InvalidHashAlgorithm"),
        ([], "UnexpectedJSONDataType"),
        (99999, "UnexpectedJSONDataType"),
        (True, "UnexpectedJSONDataType"),
    ):
        with pytest.raises(coco.CocoError) as caught:
            coco.CocoClient.hash_algorithm({"selected-hash-algorithm": bad})
        assert caught.value.variant == variant


def test_request_bodies_byte_for_byte(broker, client):
    path = put_secret(broker, b"first")
    one = client()
    assert one.get_resource(path) == b"first"
    assert one.sent["auth"] == (
        b'{"version":"0.4.0","tee":"sample","extra-params":'
        b'{"supported-hash-algorithms":["sha256","sha384","sha512","sm3"]}}'
    )
    attest = one.sent["attest"]
    key = one.tee_key.export_pubkey()
    nonce = json.loads(attest)["runtime-data"]["nonce"]
    runtime = b'{"nonce":"%s","tee-pubkey":{"kty":"EC","crv":"P-256","alg":"ECDH-ES+A256KW","x":"%s","y":"%s"}}' % (
        nonce.encode(),
        key["x"].encode(),
        key["y"].encode(),
    )
    digest = coco.hash_digest("sha384", rfc8785.dumps({"tee-pubkey": key, "nonce": nonce, "additional-evidence": ""}))
    evidence = b'{"primary_evidence":{"svn":"1","report_data":"%s"},"additional_evidence":""}' % (
        base64.b64encode(digest)
    )
    assert attest == b'{"init-data":null,"runtime-data":' + runtime + b',"tee-evidence":' + evidence + b"}"


# -- whole flows --------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_sample_tee_end_to_end(broker, client, algorithm):
    """The CoCo CI path: GET (401, no session) -> handshake -> GET; the JWE opens under both serde orders."""
    value = b"\x00coco secret \xff" + algorithm.encode()
    path = put_secret(broker, value)
    one = client(algorithm=algorithm)
    assert one.get_resource(path) == value
    assert steps(one) == [
        ("GET", "resource", 401),
        ("POST", "auth", 200),
        ("POST", "attest", 200),
        ("GET", "resource", 200),
    ]
    document = one.http.get(f"/kbs/v0/resource/{path}").json()
    assert one.tee_key.decrypt_response(document, sort=True) == value
    assert one.tee_key.decrypt_response(document, sort=False) == value
    header = coco.b64url_decode(document["protected"])
    assert header == coco.serde_json(coco.serde_value(json.loads(header), True))  # sorted, no whitespace
    claims = json.loads(coco.b64url_decode(one.token.split(".")[1]))
    assert claims["tcb-status"]["tee"] == "sample" and claims["tcb-status"]["svn"] == 1


def test_selected_hash_is_honoured(broker, client):
    """The broker selects SHA-384 from the offer; a client that reads it binds with it."""
    one = client()
    reply = one.http.post("/kbs/v0/auth", content=one.request_body(), headers={"content-type": "application/json"})
    assert reply.status_code == 200 and reply.json()["extra-params"] == {"selected-hash-algorithm": "sha384"}
    only = json.dumps({"version": "0.4.0", "tee": "sample", "extra-params": {"supported-hash-algorithms": ["SHA512"]}})
    reply = one.http.post("/kbs/v0/auth", content=only, headers={"content-type": "application/json"})
    assert reply.json()["extra-params"] == {"selected-hash-algorithm": "sha512"}
    sm3 = json.dumps({"version": "0.4.0", "tee": "sample", "extra-params": {"supported-hash-algorithms": ["sm3"]}})
    reply = one.http.post("/kbs/v0/auth", content=sm3, headers={"content-type": "application/json"})
    assert reply.status_code == 401 and reply.json()["type"] == TYPE_PREFIX + "InvalidRequest"


def test_denied_policy_rehandshakes_then_stops_unauthorized(broker, client):
    path = put_secret(broker, b"never", policy='types = ["sample"]\n[sample]\nmeasurements = ["' + "ab" * 32 + '"]\n')
    one = client()
    with pytest.raises(coco.CocoError) as caught:
        one.get_resource(path)
    assert caught.value.variant == "UnAuthorized"
    assert steps(one) == [("GET", "resource", 401), ("POST", "auth", 200), ("POST", "attest", 200)] * 3
    assert "PolicyDeny" in one.http.get(f"/kbs/v0/resource/{path}").json()["type"]


def test_missing_resource_is_404(broker, client):
    one = client()
    one.get_token()
    with pytest.raises(coco.CocoError) as caught:
        one.get_resource("default/key/nothing-here")
    assert caught.value.variant == "ResourceNotFound"


@pytest.mark.parametrize("tee", ["az-tdx-vtpm", "cca", "csv", "se", "nvidia", "hygondcu", "sampledevice", "dpu"])
def test_unsupported_tee_refused_with_401(broker, client, tee):
    one = client(coco.FixedAttester(tee, lambda report_data: {}))
    with pytest.raises(coco.CocoError) as caught:
        one.get_resource("default/key/any")
    assert caught.value.variant == "RcarHandshake" and "UnknownTee" in caught.value.detail
    assert "az-snp-vtpm" in caught.value.detail  # the refusal names what is verified
    assert steps(one) == [("GET", "resource", 401), ("POST", "auth", 401)]


# -- attestations the broker refuses ----------------------------------------------------------------------
def sample_with(change):
    def make(report_data: bytes) -> dict:
        evidence = coco.SampleAttester().get_evidence(report_data)
        return change(evidence, report_data)

    return coco.FixedAttester("sample", make)


@pytest.mark.parametrize(
    "attester, kwargs, kind",
    [
        (sample_with(lambda e, rd: dict(e, report_data=base64.b64encode(bytes(48)).decode())), {}, "EvidenceBinding"),
        (sample_with(lambda e, rd: dict(e, svn="1; drop")), {}, "EvidenceInvalid"),
        (sample_with(lambda e, rd: dict(e, svn=["1"])), {}, "EvidenceInvalid"),
        # device evidence Cove cannot verify is refused, never dropped
        (
            None,
            {"additional": {"sampledevice": lambda rd: {"svn": "2", "report_data": base64.b64encode(rd).decode()}}},
            "EvidenceInvalid",
        ),
        (None, {"init_data": "not = [toml"}, "InvalidRequest"),
        (None, {"init_data": 'algorithm = "md5"\nversion = "0.1.0"\n'}, "InvalidRequest"),
    ],
)
def test_refused_attestations(broker, client, attester, kwargs, kind):
    one = client(attester, **kwargs)
    with pytest.raises(coco.CocoError) as caught:
        one.get_token()
    assert caught.value.variant == "RcarHandshake" and f"errors:{kind}" in caught.value.detail.replace(
        TYPE_PREFIX, "errors:"
    )
    assert steps(one) == [("POST", "auth", 200), ("POST", "attest", 401)] * coco.RCAR_MAX_ATTEMPT


def test_tampered_additional_evidence_string_breaks_the_binding(broker, client):
    """additional-evidence is inside the hash: evidence made for "" does not pass with another string."""
    one = client()
    one.rcar_handshake()
    body = json.loads(one.sent["attest"])
    reply = one.http.post("/kbs/v0/auth", content=one.request_body(), headers={"content-type": "application/json"})
    body["runtime-data"]["nonce"] = reply.json()["nonce"]
    body["tee-evidence"]["additional_evidence"] = "{}"
    reply = one.http.post("/kbs/v0/attest", json=body)
    assert reply.status_code == 401 and reply.json()["type"] == TYPE_PREFIX + "EvidenceBinding"


def test_init_data_is_a_claim_for_sample(broker, client):
    body = 'algorithm = "sha256"\nversion = "0.1.0"\n[data]\n"aa.toml" = "x"\n'
    one = client(init_data=body)
    one.get_token()
    assert one.sent["attest"].startswith(b'{"init-data":{"format":"toml","body":' + json.dumps(body).encode() + b"},")
    claims = json.loads(coco.b64url_decode(one.token.split(".")[1]))["tcb-status"]
    import hashlib

    assert claims["init_data"] == hashlib.sha256(body.encode()).hexdigest()
    assert claims["init_data_claims"] == {"aa.toml": "x"}


INIT_BODY = 'algorithm = "sha256"\nversion = "0.1.0"\n[data]\n"aa.toml" = "x"\n'
INIT_DIGEST = hashlib.sha256(INIT_BODY.encode()).hexdigest()


@pytest.mark.parametrize(
    "rules, init_data, words",
    [
        (f'init_data_digests = ["{INIT_DIGEST}"]\n[sample.init_data]\n"aa.toml" = ["x"]\n', INIT_BODY, None),
        (f'init_data_digests = ["{"00" * 32}"]\n', INIT_BODY, f"init-data digest {INIT_DIGEST} is not one"),
        (f'init_data_digests = ["{INIT_DIGEST}"]\n', None, "the evidence carries no init-data"),
        ('[sample.init_data]\n"aa.toml" = ["y"]\n', INIT_BODY, "init-data data key 'aa.toml' has a value"),
    ],
)
def test_release_policy_matches_init_data(broker, client, rules, init_data, words):
    """A release policy names the init-data (digest, data values): the right one gets the secret; a wrong
    one, or none, is PolicyDeny: the client re-handshakes and stops with UnAuthorized."""
    path = put_secret(broker, b"init-data secret", policy='types = ["sample"]\n[sample]\n' + rules)
    one = client(init_data=init_data)
    if words is None:
        assert one.get_resource(path) == b"init-data secret"
        return
    with pytest.raises(coco.CocoError) as caught:
        one.get_resource(path)
    assert caught.value.variant == "UnAuthorized"
    assert steps(one) == [("GET", "resource", 401), ("POST", "auth", 200), ("POST", "attest", 200)] * 3
    refusal = one.http.get(f"/kbs/v0/resource/{path}").json()
    assert refusal["type"] == TYPE_PREFIX + "PolicyDeny" and words in refusal["detail"], refusal


def test_serve_refuses_an_oversized_or_init_data_attestation_policy(tmp_path):
    """`cove kbs serve --policy`: read up to 1 MiB; init-data rules, which only release policies can
    match, refused rather than denying every attestation. One line, exit 2 (docs/cli.md)."""
    import subprocess

    from tests.conftest import COVE

    (tmp_path / "init.toml").write_text(f'types = ["sample"]\n[sample]\ninit_data_digests = ["{INIT_DIGEST}"]\n')
    for policy, words in (
        ("/dev/zero", "policy /dev/zero: larger than 1 MiB"),
        (str(tmp_path / "init.toml"), "belong in release policies"),
    ):
        done = subprocess.run(
            [
                COVE,
                "kbs",
                "serve",
                "--db",
                f"sqlite:///{tmp_path / 'kbs.db'}",
                "--insecure-http",
                "--listen",
                "127.0.0.1:0",
                "--policy",
                policy,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and words in lines[0], done.stderr


def test_joserfc_header_order_would_break_a_sorting_client():
    """Regression: joserfc writes epk as crv, x, y, kty; a client whose serde_json sorts rebuilds
    another AAD and cannot open it. Cove's header opens under both."""
    from joserfc import jwe

    from cove.kbs import jose

    tee = coco.TeeKeyPair()
    key, alg = jose.tee_key(tee.export_pubkey())
    compact = jwe.encrypt_compact({"alg": alg, "enc": "A256GCM"}, b"x", key, algorithms=[alg, "A256GCM"])
    old = dict(zip(("protected", "encrypted_key", "iv", "ciphertext", "tag"), compact.split(".")))
    with pytest.raises(coco.CocoError):
        tee.decrypt_response(old, sort=True)
    new = jose.encrypt_to(tee.export_pubkey(), b"x")
    assert tee.decrypt_response(new, sort=True) == tee.decrypt_response(new, sort=False) == b"x"


# -- hardware evidence in the attesters' shapes (tests/data/vectors, at the vectors' times) ------------------
def ccel(events: list[tuple[int, bytes]], end_flag: bool = True) -> bytes:
    """A CC event log as the TDX attester sends it: a TCG2 Spec ID header (SHA-384), events, 0xFF x 8."""
    spec = b"Spec ID Event03\x00" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 1) + struct.pack("<HH", 0x000C, 48) + b"\x00"
    out = struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", len(spec)) + spec
    for index, data in events:
        out += struct.pack("<III", index, 0x0D, 1) + struct.pack("<H", 0x000C) + hashlib.sha384(data).digest()
        out += struct.pack("<I", len(data)) + data
    return out + (b"\xff" * 8 if end_flag else b"")


def test_event_log_replays_to_rtmrs():
    events = [(1, b"kernel"), (2, b"cmdline"), (1, b"initrd"), (4, b"aael")]
    expected = [bytes(48)] * 4
    for index, data in events:
        expected[index - 1] = hashlib.sha384(expected[index - 1] + hashlib.sha384(data).digest()).digest()
    assert replay_rtmrs(ccel(events)) == tuple(expected)
    assert replay_rtmrs(ccel(events, end_flag=False)) == tuple(expected)
    for bad in (b"\x00" * 64, ccel(events)[:-20], ccel(events, end_flag=False) + bytes(5)):
        with pytest.raises(Problem) as caught:
            replay_rtmrs(bad)
        assert caught.value.kind == "EvidenceInvalid" and "cc_eventlog" in caught.value.detail


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def attest_log(broker) -> dict:
    return broker.admin.audit(action="attest")[-1]


@pytest.mark.parametrize(
    "tee, evidence, kind, words",
    [
        # verified (signatures, chains, collateral from the broker's folder), then refused: the vector's report
        # data was not made for this challenge, and cannot be
        ("sgx", lambda: {"quote": b64(vector("sgx/quote.bin"))}, "EvidenceBinding", "report data"),
        ("tdx", lambda: {"cc_eventlog": None, "quote": b64(vector("tdx/quote.bin"))}, "EvidenceBinding", "report data"),
        # a CC event log that does not replay to the quote's RTMRs
        (
            "tdx",
            lambda: {"cc_eventlog": b64(ccel([(1, b"not what ran")])), "quote": b64(vector("tdx/quote.bin"))},
            "EvidenceInvalid",
            "cc_eventlog replays RTMR0",
        ),
        # a tampered quote fails verification with the same collateral
        (
            "sgx",
            lambda: {"quote": b64(vector("sgx/quote.bin")[:120] + b"\x01" + vector("sgx/quote.bin")[121:])},
            "EvidenceInvalid",
            "sgx",
        ),
    ],
)
def test_dcap_vectors_in_the_attesters_shapes(broker, client, tee, evidence, kind, words):
    EVIDENCE_TIME["tee"] = tee
    try:
        one = client(coco.FixedAttester(tee, lambda report_data: evidence()))
        with pytest.raises(coco.CocoError) as caught:
            one.rcar_handshake()
    finally:
        EVIDENCE_TIME.clear()
    assert f"{TYPE_PREFIX}{kind}" in caught.value.detail
    entry = attest_log(broker)
    assert entry["outcome"] == "denied" and kind in entry["detail"] and words in entry["detail"], entry


def test_quote_without_collateral_says_how_to_get_it(tmp_path):
    with pytest.raises(Problem) as caught:
        CollateralSource(tmp_path / "empty").collateral_for("sgx", vector("sgx/quote.bin"))
    assert caught.value.kind == "EvidenceInvalid" and "cove kbs collateral import" in caught.value.detail


def test_collateral_import_command(tmp_path):
    import subprocess

    from tests.conftest import COVE

    def cove(*args):
        return subprocess.run([COVE, "kbs", "collateral", "import", *args], capture_output=True, text=True)

    done = cove("--tee", "tdx", "--dir", str(tmp_path / "c"), str(VECTORS / "tdx" / "collateral.json"))
    assert done.returncode == 0, done.stderr
    stored = list((tmp_path / "c").iterdir())
    assert [p.name for p in stored] == ["tdx-b0c06f000000.json"]
    for args, words in (
        (("--tee", "sgx", str(VECTORS / "tdx" / "collateral.json")), "not sgx collateral"),
        (("--tee", "tdx", str(VECTORS / "tdx" / "quote.bin")), "is not valid JSON"),
        (("--tee", "tdx", str(tmp_path / "missing.json")), "cannot read"),
    ):
        refused = cove(*args[:2], "--dir", str(tmp_path / "c"), *args[2:])
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode != 0 and len(lines) == 1 and words in lines[0], refused.stderr
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["tdx-b0c06f000000.json"]  # nothing half-written


# -- TPM quotes in the attester's shape, and Cove evidence, from a real swtpm ----------------------------
def swtpm_quote(platform, report_data: bytes) -> dict:
    """What guest-components' TPM attester sends, made with the platform's swtpm and AK: the report data
    resized to 32 bytes as extraData, all 24 SHA-256 PCRs."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from cove.attest.tpm_structs import parse_pcr_file, parse_public
    from cove.platform.tpm2 import Tpm

    config = platform.read_config()
    message, signature, pcr_file = Tpm(config.tcti).quote(
        config.ak_handle, list(range(24)), (report_data + bytes(32))[:32]
    )
    pcrs = parse_pcr_file(pcr_file)["sha256"]
    public = parse_public(platform.ak_public.read_bytes())  # the platform's AK: ECDSA P-256
    ak = (
        ec.EllipticCurvePublicNumbers(
            int.from_bytes(public.ecc_x, "big"), int.from_bytes(public.ecc_y, "big"), ec.SECP256R1()
        )
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return {
        "tpm_quote": {"signature": b64(signature), "message": b64(message), "pcrs": [pcrs[i].hex() for i in range(24)]},
        "ak_public": b64(ak),
    }


def test_tpm_quote_from_swtpm_in_the_attesters_shape(broker, client, platform):
    value = b"for a vTPM guest"
    path = put_secret(broker, value, policy='types = ["tpm"]\n')
    one = client(coco.FixedAttester("tpm", lambda report_data: swtpm_quote(platform, report_data)))
    assert one.get_resource(path) == value
    reply = one.http.post(
        "/kbs/v0/auth",
        content=one.request_body().replace(b'"sample"', b'"tpm"'),
        headers={"content-type": "application/json"},
    )
    assert reply.json()["extra-params"] == {"selected-hash-algorithm": "sha256"}  # fits the 32-byte extraData


def test_cove_evidence_through_the_coco_client(broker, client, platform):
    value = b"for a Cove enclave"
    path = put_secret(
        broker, value, policy=f'types = ["cove"]\n[cove]\nmeasurements = ["{CLAIMS.measurement.hex()}"]\n'
    )
    # no CoCo attester makes Cove evidence: this one pads the hash to the report's 64 bytes, as the TDX and
    # SNP attesters do, and is what /dev/attestation returns to an enclave
    provider = PlatformEvidence(platform)
    one = client(coco.FixedAttester("cove", lambda report_data: provider.evidence((report_data + bytes(64))[:64])))
    assert one.get_resource(path) == value
    claims = json.loads(coco.b64url_decode(one.token.split(".")[1]))["tcb-status"]
    assert claims["tee"] == "cove" and claims["platform_root"] == "tpm"


@pytest.mark.parametrize(
    "change, kind",
    [
        (lambda e: e, "EvidenceBinding"),  # Trustee's own fixture: verifies, but was bound to another nonce
        (
            lambda e: dict(e, tpm_quote=dict(e["tpm_quote"], pcrs=["11" * 32] + e["tpm_quote"]["pcrs"][1:])),
            "EvidenceInvalid",
        ),  # PCR 0 changed: the quote's PCR digest no longer matches
        (lambda e: dict(e, tpm_quote=dict(e["tpm_quote"], pcrs=["zz"] * 24)), "EvidenceInvalid"),
    ],
)
def test_trustee_tpm_fixture(broker, client, change, kind):
    fixture = json.loads(TRUSTEE_TPM.read_bytes())
    one = client(coco.FixedAttester("tpm", lambda report_data: change(fixture)))
    with pytest.raises(coco.CocoError) as caught:
        one.rcar_handshake()
    assert f"{TYPE_PREFIX}{kind}" in caught.value.detail


def test_quote_of_an_untrusted_ak_refused(broker, client, tmp_path_factory):
    """The attester's ak_public is not trusted for being sent: only --tpm-ak keys are."""
    platforms = TpmPlatforms(tmp_path_factory.mktemp("tpm-b"))
    try:
        other = platforms.make("b")
        one = client(coco.FixedAttester("tpm", lambda report_data: swtpm_quote(other, report_data)))
        with pytest.raises(coco.CocoError) as caught:
            one.rcar_handshake()
    finally:
        platforms.stop_all()
    assert f"{TYPE_PREFIX}EvidenceInvalid" in caught.value.detail


# -- az-snp-vtpm: Trustee's fixtures (deps/verifier/test_data/az-snp-vtpm @ 258ea4ac) ---------------------
AZURE = Path(__file__).parent / "coco_fixtures"


def azure(version: int, change=lambda e: e) -> dict:
    return change(json.loads((AZURE / f"az-snp-vtpm-evidence-v{version}.json").read_bytes()))


def flip_hcl(offset: int):
    def change(evidence: dict) -> dict:
        raw = bytearray(base64.urlsafe_b64decode(evidence["hcl_report"] + "=="))
        raw[offset] ^= 0x01
        return dict(evidence, hcl_report=base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("="))

    return change


def quote_with(**members):
    return lambda evidence: dict(evidence, tpm_quote=dict(evidence["tpm_quote"], **members))


@pytest.mark.parametrize(
    "version, change, kind, words",
    [
        # every link verifies (SNP report with AMD's chain, HCL data, vTPM quote), then the binding is refused:
        # the fixtures were made for Trustee's test nonces
        (1, lambda e: e, "EvidenceBinding", "report data"),
        (2, lambda e: e, "EvidenceBinding", "report data"),
        (2, flip_hcl(32 + 1184 + 20 + 40), "EvidenceInvalid", "not the hash of the HCL variable data"),
        (2, flip_hcl(32 + 0x90), "EvidenceInvalid", "snp"),  # the SNP report's MEASUREMENT
        (2, quote_with(message=azure(2)["tpm_quote"]["message"][:-2] + "5a"), "EvidenceInvalid", "vTPM quote"),
        (2, quote_with(pcrs=["11" * 32] + azure(2)["tpm_quote"]["pcrs"][1:]), "EvidenceInvalid", "PCR digest"),
        (2, lambda e: dict(e, version=0), "EvidenceInvalid", "versions 1 and 2"),
        (1, lambda e: dict(e, vcek=azure(1)["vcek"][:-40]), "EvidenceInvalid", "snp"),
    ],
)
def test_az_snp_vtpm_fixtures(broker, client, version, change, kind, words):
    one = client(coco.FixedAttester("az-snp-vtpm", lambda report_data: azure(version, change)))
    with pytest.raises(coco.CocoError) as caught:
        one.rcar_handshake()
    assert f"{TYPE_PREFIX}{kind}" in caught.value.detail
    entry = attest_log(broker)
    assert entry["outcome"] == "denied" and words in entry["detail"], entry


# -- SEV-SNP in the attester's shape: the sev crate's AttestationReport as JSON ---------------------------
def sev_json(raw: bytes, key_type: str, key: bytes) -> dict:
    """What guest-components' SNP attester sends for a report (serde of virtee/sev v6.3
    AttestationReport: byte arrays as lists, TcbVersion/Version as objects, policy and plat_info as
    integers), written from Cove's own parse of the vector (cove.attest.snp_report, AMD's offsets)."""
    from cove.attest.snp_report import parse_snp_report

    r = parse_snp_report(raw, "Milan")

    def tcb(t) -> dict:
        return {"fmc": t.fmc, "bootloader": t.bootloader, "tee": t.tee, "snp": t.snp, "microcode": t.microcode}

    def version(v) -> dict:
        return {"major": v.major, "minor": v.minor, "build": v.build}

    report = {
        "version": r.version,
        "guest_svn": r.guest_svn,
        "policy": r.policy.raw,
        "family_id": list(r.family_id),
        "image_id": list(r.image_id),
        "vmpl": r.vmpl,
        "sig_algo": r.signature_algo,
        "current_tcb": tcb(r.current_tcb),
        "plat_info": r.platform_info.raw,
        "key_info": int.from_bytes(raw[0x48:0x4C], "little"),
        "report_data": list(r.report_data),
        "measurement": list(r.measurement),
        "host_data": list(r.host_data),
        "id_key_digest": list(r.id_key_digest),
        "author_key_digest": list(r.author_key_digest),
        "report_id": list(r.report_id),
        "report_id_ma": list(r.report_id_ma),
        "reported_tcb": tcb(r.reported_tcb),
        "cpuid_fam_id": r.cpuid_family,
        "cpuid_mod_id": r.cpuid_model,
        "cpuid_step": r.cpuid_stepping,
        "chip_id": list(r.chip_id),
        "committed_tcb": tcb(r.committed_tcb),
        "current": version(r.current_version),
        "committed": version(r.committed_version),
        "launch_tcb": tcb(r.launch_tcb),
        "launch_mit_vector": r.launch_mit_vector,
        "current_mit_vector": r.current_mit_vector,
        "signature": {"r": list(r.signature_r.to_bytes(72, "little")), "s": list(r.signature_s.to_bytes(72, "little"))},
    }
    return {
        "attestation_report": report,
        "cert_chain": [{"cert_type": "ARK", "data": [1, 2]}, {"cert_type": key_type, "data": list(key)}],
    }


def test_sev_json_rebuilds_the_report_bytes():
    from cove.kbs.coco_evidence import snp_report_bytes

    for report, key in (("snp/report.bin", "snp/vcek.der"), ("snp/vlek_report.bin", "snp/vlek.der")):
        raw = vector(report)
        assert snp_report_bytes(sev_json(raw, "VCEK", vector(key))["attestation_report"]) == raw


def test_sev_json_of_an_older_sev_crate():
    """The layout of a report from a CoCo pod as an older sev crate wrote it (_author_key_en,
    current_build/minor/major; copied from a public CoCo deployment guide): fields land where
    cove.attest.snp_report reads them."""
    from cove.attest.snp_report import parse_snp_report
    from cove.kbs.coco_evidence import snp_report_bytes

    old = json.loads((AZURE / "sev-crate-report-v2.json").read_bytes())["attestation_report"]
    parsed = parse_snp_report(snp_report_bytes(old), "Milan")
    assert parsed.report_data[:4] == b"test" and parsed.measurement == bytes(old["measurement"])
    assert parsed.chip_id == bytes(old["chip_id"]) and parsed.reported_tcb.microcode == 213
    assert (parsed.current_version.major, parsed.current_version.minor, parsed.current_version.build) == (1, 55, 8)
    assert parsed.policy.raw == 196608 and parsed.vmpl == 0


def flip_measurement(evidence: dict) -> dict:
    report = dict(evidence["attestation_report"])
    report["measurement"] = [report["measurement"][0] ^ 1] + report["measurement"][1:]
    return dict(evidence, attestation_report=report)


@pytest.mark.parametrize(
    "report, key, key_type, change, kind, words",
    [
        ("snp/report.bin", "snp/vcek.der", "VCEK", lambda e: e, "EvidenceBinding", "report data"),
        ("snp/vlek_report.bin", "snp/vlek.der", "VLEK", lambda e: e, "EvidenceBinding", "report data"),  # at VLEK_TIME
        ("snp/report.bin", "snp/vcek.der", "VCEK", flip_measurement, "EvidenceInvalid", "snp"),
        ("snp/report.bin", "snp/vcek.der", "VCEK", lambda e: dict(e, cert_chain=None), "EvidenceInvalid", "no VCEK"),
        (
            "snp/report.bin",
            "snp/vcek.der",
            "VCEK",
            lambda e: dict(e, attestation_report=dict(e["attestation_report"], report_data=[300] * 64)),
            "EvidenceInvalid",
            "report_data must be",
        ),
    ],
)
def test_snp_vector_in_the_attesters_shape(broker, client, report, key, key_type, change, kind, words):
    EVIDENCE_TIME["tee"] = "snp-vlek" if key_type == "VLEK" else "snp"
    try:
        one = client(
            coco.FixedAttester("snp", lambda report_data: change(sev_json(vector(report), key_type, vector(key))))
        )
        with pytest.raises(coco.CocoError) as caught:
            one.rcar_handshake()
    finally:
        EVIDENCE_TIME.clear()
    assert f"{TYPE_PREFIX}{kind}" in caught.value.detail
    entry = attest_log(broker)
    assert entry["outcome"] == "denied" and words in entry["detail"], entry


# -- init-data bound to each TEE's configuration field -------------------------------------------------
def test_init_data_binding_per_tee():
    from cove.attest.appraisal import Appraisal
    from cove.kbs import coco_evidence

    body = 'algorithm = "sha256"\nversion = "0.1.0"\n[data]\nkey = "v"\n'
    init = coco_evidence.init_data({"format": "toml", "body": body})
    digest = hashlib.sha256(body.encode()).digest()
    assert init.digest == digest
    cases = [
        ("tdx", Appraisal("tdx", claims={"body": {"mr_config_id": (digest + bytes(16)).hex()}}), True),
        ("tdx", Appraisal("tdx", claims={"body": {"mr_config_id": bytes(48).hex()}}), False),
        ("snp", Appraisal("snp", claims={"report": {"host_data": digest.hex()}}), True),
        ("snp", Appraisal("snp", claims={"report": {"host_data": bytes(32).hex()}}), False),
        ("az-snp-vtpm", Appraisal("snp", pcrs={"sha256": {8: hashlib.sha256(bytes(32) + digest).digest()}}), True),
        ("az-snp-vtpm", Appraisal("snp", pcrs={"sha256": {8: bytes(32)}}), False),
        ("tpm", Appraisal("tpm", pcrs={"sha256": {8: hashlib.sha256(bytes(32) + digest).digest()}}), True),
        ("tpm", Appraisal("tpm"), False),
        ("cove", Appraisal("cove"), False),
    ]
    for tee, result, bound in cases:
        if bound:
            claims = coco_evidence.bind_init_data(tee, result, init)
            assert claims["init_data"] == digest.hex() and claims["init_data_claims"] == {"key": "v"}, tee
        else:
            with pytest.raises(Problem) as caught:
                coco_evidence.bind_init_data(tee, result, init)
            assert caught.value.kind in ("EvidenceBinding", "EvidenceInvalid"), tee
    assert coco_evidence.bind_init_data("tdx", cases[1][1], None) == {}  # no init-data, nothing to bind


# -- init-data bound by a real (sw)TPM and matched by release policies -------------------------------------
TPM_INIT_BODY = 'algorithm = "sha256"\nversion = "0.1.0"\n[data]\n"policy.rego" = "package agent_policy"\n'
TPM_INIT_DIGEST = hashlib.sha256(TPM_INIT_BODY.encode()).digest()


@pytest.mark.parametrize(
    "digest, init_data, kind, words",
    [
        (TPM_INIT_DIGEST, TPM_INIT_BODY, None, None),
        (bytes(32), TPM_INIT_BODY, "PolicyDeny", f"init-data digest {TPM_INIT_DIGEST.hex()} is not one"),
        (TPM_INIT_DIGEST, None, "PolicyDeny", "the evidence carries no init-data"),
        # init-data the TPM did not measure: refused at /attest, before any policy
        (TPM_INIT_DIGEST, TPM_INIT_BODY + "# changed\n", "EvidenceBinding", "PCR 8"),
    ],
)
def test_tpm_init_data_in_pcr8_matched_by_a_release_policy(broker, client, platform, digest, init_data, kind, words):
    """The CoCo TPM attester's flow: the init-data digest extended once into PCR 8 of the swtpm (as the
    guest's boot does), then a release policy naming that digest."""
    from cove.platform.tpm2 import Tpm

    tpm = Tpm(platform.read_config().tcti)
    measured = hashlib.sha256(bytes(32) + TPM_INIT_DIGEST).digest()
    if tpm.read_pcr(8) == bytes(32):  # PCR 8 cannot be reset: extended once for the module's swtpm
        tpm.extend(8, TPM_INIT_DIGEST)
    assert tpm.read_pcr(8) == measured
    path = put_secret(
        broker, b"for this pod's init-data", policy=f'types = ["tpm"]\n[tpm]\ninit_data_digests = ["{digest.hex()}"]\n'
    )
    one = client(coco.FixedAttester("tpm", lambda report_data: swtpm_quote(platform, report_data)), init_data=init_data)
    if kind is None:
        assert one.get_resource(path) == b"for this pod's init-data"
        claims = json.loads(coco.b64url_decode(one.token.split(".")[1]))["tcb-status"]
        assert claims["init_data"] == TPM_INIT_DIGEST.hex() and claims["init_data_claims"] == {
            "policy.rego": "package agent_policy"
        }
        return
    with pytest.raises(coco.CocoError) as caught:
        one.get_resource(path)
    if kind == "EvidenceBinding":
        assert caught.value.variant == "RcarHandshake" and kind in caught.value.detail
        entry = attest_log(broker)
        assert entry["outcome"] == "denied" and f"tpm: {kind}" in entry["detail"] and words in entry["detail"]
        return
    assert caught.value.variant == "UnAuthorized"
    assert steps(one) == [("GET", "resource", 401), ("POST", "auth", 200), ("POST", "attest", 200)] * 3
    refusal = one.http.get(f"/kbs/v0/resource/{path}").json()
    assert refusal["type"] == TYPE_PREFIX + kind and words in refusal["detail"], refusal
