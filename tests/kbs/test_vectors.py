"""Real hardware evidence (tests/data/vectors) through the broker over HTTPS.

A plain client sends the vectors as tee-evidence. Each verifies (signatures,
chains, collateral, at a time inside the collateral windows), and the broker
then refuses it because its report data cannot be the hash of this
session's runtime-data: real evidence from elsewhere is never accepted for a
fresh challenge. Tampered or out-of-date vectors are refused earlier, as
EvidenceInvalid, with the verifier's reason.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from cove.kbs import jose
from cove.kbs.problems import TYPE_PREFIX

VECTORS = Path(__file__).resolve().parents[1] / "data" / "vectors"
SGX_TIME = datetime(2025, 6, 19, 11, 56, 11, tzinfo=timezone.utc)
TDX_TIME = datetime(2025, 6, 19, 11, 16, 3, tzinfo=timezone.utc)
SNP_TIME = datetime(2026, 11, 15, tzinfo=timezone.utc)
TODAY = datetime(2026, 11, 15, tzinfo=timezone.utc)
ALL_TYPES = (
    'types = ["tpm", "sgx", "tdx", "snp"]\n[sgx]\ntcb_statuses = ["UpToDate", "ConfigurationAndSWHardeningNeeded"]\n'
)


def vector(rel: str) -> bytes:
    path = VECTORS / rel
    assert path.is_file(), f"missing test vector {rel}: restore tests/data/vectors from the repository"
    return path.read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def evidence_for(tee: str, flip: int | None = None) -> dict:
    def maybe_flip(data: bytes) -> bytes:
        if flip is None:
            return data
        raw = bytearray(data)
        raw[flip] ^= 0x01
        return bytes(raw)

    if tee == "tpm":
        return {
            "quote": b64(maybe_flip(vector("tpm/quote_attest.bin"))),
            "signature": b64(vector("tpm/quote_sig.bin")),
            "pcrs": b64(vector("tpm/quote_pcrs.bin")),
        }
    if tee in ("sgx", "tdx"):
        return {
            "quote": b64(maybe_flip(vector(f"{tee}/quote.bin"))),
            "collateral": json.loads(vector(f"{tee}/collateral.json")),
        }
    return {"report": b64(maybe_flip(vector("snp/report.bin"))), "vcek": b64(vector("snp/vcek.der"))}


def anchors():
    from cove.kbs.evidence_appraisal import TrustAnchors

    return TrustAnchors(
        sgx_root_ca=vector("intel_sgx_root_ca.pem"),
        snp_ask_ark=[vector("snp/ask_ark_milan.pem")],
        tpm_aks=[vector("tpm/ak_pub.pem")],
    )


def attest_raw(kbs, tee: str, evidence: dict):
    client = kbs.client()
    nonce = client.challenge(tee)
    runtime = {"nonce": nonce, "tee-pubkey": jose.public_jwk(jose.new_tee_key())}
    return client.http.post("/kbs/v0/attest", json={"runtime-data": runtime, "tee-evidence": evidence})


@pytest.mark.parametrize("tee, when", [("tpm", TODAY), ("sgx", SGX_TIME), ("tdx", TDX_TIME), ("snp", SNP_TIME)])
def test_vector_verifies_then_binding_refused(make_kbs, db_url, tee, when):
    kbs = make_kbs(db_url, policy=ALL_TYPES, anchors=anchors(), evidence_time=lambda: when)
    reply = attest_raw(kbs, tee, evidence_for(tee))
    assert reply.status_code == 401, reply.text
    assert reply.json()["type"] == TYPE_PREFIX + "EvidenceBinding", reply.text
    log = kbs.admin.audit(action="attest")
    assert log[-1]["outcome"] == "denied" and "EvidenceBinding" in log[-1]["detail"]


@pytest.mark.parametrize(
    "tee, when, offset", [("tpm", TODAY, 40), ("sgx", SGX_TIME, 120), ("tdx", TDX_TIME, 200), ("snp", SNP_TIME, 0x50)]
)
def test_tampered_vector_refused(make_kbs, tee, when, offset):
    kbs = make_kbs(policy=ALL_TYPES, anchors=anchors(), evidence_time=lambda: when)
    reply = attest_raw(kbs, tee, evidence_for(tee, flip=offset))
    assert reply.status_code == 401
    body = reply.json()
    assert body["type"] == TYPE_PREFIX + "EvidenceInvalid", body
    assert body["detail"].startswith(tee)


def test_dcap_at_todays_date_refused_for_expired_collateral(make_kbs):
    kbs = make_kbs(policy=ALL_TYPES, anchors=anchors(), evidence_time=lambda: TODAY)
    reply = attest_raw(kbs, "sgx", evidence_for("sgx"))
    body = reply.json()
    assert body["type"] == TYPE_PREFIX + "EvidenceInvalid" and "expired" in body["detail"], body


def test_untrusted_roots_refused(make_kbs):
    from cove.kbs.evidence_appraisal import TrustAnchors

    kbs = make_kbs(
        policy=ALL_TYPES,
        anchors=TrustAnchors(snp_ask_ark=[vector("snp/ask_ark_genoa.pem")]),
        evidence_time=lambda: SNP_TIME,
    )
    for tee in ("snp", "sgx", "tpm"):
        body = attest_raw(kbs, tee, evidence_for(tee)).json()
        assert body["type"] == TYPE_PREFIX + "EvidenceInvalid", body


def test_hardware_evidence_needs_the_tee_the_session_named(make_kbs):
    """sgx evidence in a session opened for snp is read as snp evidence, and fails."""
    kbs = make_kbs(policy=ALL_TYPES, anchors=anchors(), evidence_time=lambda: SGX_TIME)
    body = attest_raw(kbs, "snp", evidence_for("sgx")).json()
    assert body["type"] == TYPE_PREFIX + "EvidenceInvalid"


def test_broker_over_https_and_cove_verify_agree(make_kbs, cove, tmp_path):
    """Every vector, valid or tampered: the broker refuses a valid one only for its binding, an invalid one
    with the very reason `cove verify` prints (one dispatcher behind both)."""
    from tests.attest.test_one_dispatch import CASES, PERMISSIVE, broker_evidence, flipped

    from cove.kbs.evidence_appraisal import TrustAnchors

    at = {"time": TODAY}
    kbs = make_kbs(
        policy=PERMISSIVE, anchors=TrustAnchors(tpm_aks=[vector("tpm/ak_pub.pem")]), evidence_time=lambda: at["time"]
    )
    policy = tmp_path / "policy.toml"
    policy.write_text(PERMISSIVE)
    for name, tee, rel, flip, when, sidecars in CASES:
        evidence = tmp_path / f"{name}.bin"
        evidence.write_bytes(flipped(rel, flip))
        args = ["verify", evidence, "--type", tee, "--time", when, "--policy", policy]
        for option, sidecar in sidecars.items():
            args += [option, VECTORS / sidecar]
        if tee == "tpm":
            args += ["--ak", VECTORS / "tpm/ak_pub.pem"]
        cli = cove(*args)
        at["time"] = datetime.fromisoformat(when.replace("Z", "+00:00"))
        body = attest_raw(kbs, tee, broker_evidence(tee, evidence.read_bytes(), sidecars)).json()
        if cli.returncode == 5:
            assert body["type"] == TYPE_PREFIX + "EvidenceInvalid", (name, body)
            assert body["detail"] in cli.stderr, (name, body, cli.stderr)
        else:
            assert cli.returncode in (0, 6), (name, cli.stderr)  # valid (the policy may refuse a debug guest)
            assert body["type"] == TYPE_PREFIX + "EvidenceBinding", (name, body)
