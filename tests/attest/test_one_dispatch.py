"""`cove verify` and the key broker give one verdict on one piece of evidence.

Both go through cove.attest.verifier: the same checks, the same default
roots, the same claims. Each case runs the real CLI and the broker's
appraisal (what /kbs/v0/attest calls before the report-data binding) on the
same vector with the same trust anchors, at the same time, and compares the
claims, or the reason for refusing.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime

import pytest

from cove.kbs import evidence_appraisal
from cove.kbs import broker_policy as kbs_policy
from cove.kbs.problems import Problem
from tests.attest.attest_vectors import VECTORS, vector

PERMISSIVE = (
    'types = ["tpm", "sgx", "tdx", "snp"]\n[sgx]\ntcb_statuses = ["UpToDate", '
    '"ConfigurationAndSWHardeningNeeded", "OutOfDate"]\n[tdx]\ntcb_statuses = ["UpToDate", "OutOfDate"]\n'
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def flipped(rel: str, offset: int | None) -> bytes:
    data = bytearray(vector(rel))
    if offset is not None:
        data[offset] ^= 1
    return bytes(data)


# (name, tee, evidence file, byte to flip, time, sidecar files by CLI option); names ending in
# today/expired/invalid, and flipped vectors, must be refused; every other vector must verify.
CASES = [
    ("sgx", "sgx", "sgx/quote.bin", None, "2025-06-19T12:56:11Z", {"--collateral": "sgx/collateral.json"}),
    ("sgx-today", "sgx", "sgx/quote.bin", None, "2026-11-15T00:00:00Z", {"--collateral": "sgx/collateral.json"}),
    ("sgx-tampered", "sgx", "sgx/quote.bin", 120, "2025-06-19T12:56:11Z", {"--collateral": "sgx/collateral.json"}),
    ("tdx", "tdx", "tdx/quote.bin", None, "2025-06-19T12:16:03Z", {"--collateral": "tdx/collateral.json"}),
    (
        "tdx-no-tcb-level-invalid",
        "tdx",
        "tdx/quote_outdated.bin",
        None,
        "2026-02-18T11:58:51Z",
        {"--collateral": "tdx/collateral_outdated.json"},
    ),
    ("snp-vcek", "snp", "snp/report.bin", None, "2026-01-01T00:00:00Z", {"--vcek": "snp/vcek.der"}),
    ("snp-vcek-tampered", "snp", "snp/report.bin", 0x50, "2026-01-01T00:00:00Z", {"--vcek": "snp/vcek.der"}),
    ("snp-vcek-expired", "snp", "snp/report.bin", None, "2031-01-01T00:00:00Z", {"--vcek": "snp/vcek.der"}),
    ("snp-vlek", "snp", "snp/vlek_report.bin", None, "2025-06-01T00:00:00Z", {"--vcek": "snp/vlek.der"}),
    ("snp-vlek-tampered", "snp", "snp/vlek_report.bin", 0x60, "2025-06-01T00:00:00Z", {"--vcek": "snp/vlek.der"}),
    (
        "tpm",
        "tpm",
        "tpm/quote_attest.bin",
        None,
        "2026-01-01T00:00:00Z",
        {"--tpm-sig": "tpm/quote_sig.bin", "--tpm-pcrs": "tpm/quote_pcrs.bin"},
    ),
    (
        "tpm-tampered",
        "tpm",
        "tpm/quote_attest.bin",
        40,
        "2026-01-01T00:00:00Z",
        {"--tpm-sig": "tpm/quote_sig.bin", "--tpm-pcrs": "tpm/quote_pcrs.bin"},
    ),
]
BROKER_FIELD = {"--collateral": "collateral", "--vcek": "vcek", "--tpm-sig": "signature", "--tpm-pcrs": "pcrs"}


def broker_evidence(tee: str, raw: bytes, sidecars: dict) -> dict:
    evidence = {"tpm": "quote", "sgx": "quote", "tdx": "quote", "snp": "report"}[tee]
    out: dict = {evidence: b64(raw)}
    for option, rel in sidecars.items():
        field = BROKER_FIELD[option]
        out[field] = json.loads(vector(rel)) if field == "collateral" else b64(vector(rel))
    return out


@pytest.mark.parametrize("name, tee, rel, flip, when, sidecars", CASES, ids=[c[0] for c in CASES])
def test_cli_and_broker_agree(cove, tmp_path, name, tee, rel, flip, when, sidecars):
    evidence = tmp_path / "evidence.bin"
    evidence.write_bytes(flipped(rel, flip))
    policy = tmp_path / "policy.toml"
    policy.write_text(PERMISSIVE)
    args = ["verify", evidence, "--type", tee, "--time", when, "--policy", policy, "--json"]
    for option, sidecar in sidecars.items():
        args += [option, VECTORS / sidecar]
    anchors = evidence_appraisal.TrustAnchors()
    if tee == "tpm":
        args += ["--ak", VECTORS / "tpm/ak_pub.pem"]
        anchors = evidence_appraisal.TrustAnchors(tpm_aks=[vector("tpm/ak_pub.pem")])
    cli = cove(*args)
    anchors = anchors.with_policy_roots(kbs_policy.load(PERMISSIVE))
    try:
        broker = evidence_appraisal.verify(
            tee,
            broker_evidence(tee, evidence.read_bytes(), sidecars),
            anchors,
            datetime.fromisoformat(when.replace("Z", "+00:00")),
        )
    except Problem as problem:
        assert problem.kind == "EvidenceInvalid"
        assert cli.returncode == 5, (name, cli.stdout, cli.stderr)
        assert json.loads(cli.stdout)["error"] == problem.detail
        assert flip is not None or name.endswith(("today", "expired", "invalid")), f"{name}: the vector must verify"
        return
    assert cli.returncode in (0, 6), (name, cli.stderr)
    result = json.loads(cli.stdout)
    assert result["valid"] is True
    claims = evidence_appraisal.to_claims(broker)
    assert claims.pop("tee") == tee
    assert result["claims"] == claims
    assert flip is None, f"{name}: a tampered vector verified"


def _other_root_pem() -> str:
    """A self-signed CA that is not Intel's (the ARK of AMD's Milan chain will do)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    ark = x509.load_pem_x509_certificates(vector("snp/ask_ark_milan.pem"))[1]
    return ark.public_bytes(Encoding.PEM).decode()


def test_dcap_uses_every_trusted_root():
    """The Intel root second in the bundle: the PCK chain is checked against each root, not only the first."""
    from cove.attest.dcap import verify_sgx_quote

    bundle = _other_root_pem().encode() + vector("intel_sgx_root_ca.pem")
    claims = verify_sgx_quote(
        vector("sgx/quote.bin"),
        json.loads(vector("sgx/collateral.json")),
        bundle,
        datetime.fromisoformat("2025-06-19T12:56:11+00:00"),
    )
    assert claims.tee == "sgx"


def test_broker_keeps_sgx_and_tdx_roots_apart():
    """[sgx] roots name another CA, [tdx] roots Intel's: tdx verifies, sgx does not (they used to be merged)."""
    intel = vector("intel_sgx_root_ca.pem").decode()
    text = (
        f'types = ["sgx", "tdx"]\n[sgx]\nroots = [{json.dumps(_other_root_pem())}]\n'
        f"[tdx]\nroots = [{json.dumps(intel)}]\n"
    )
    anchors = evidence_appraisal.TrustAnchors().with_policy_roots(kbs_policy.load(text))
    tdx = broker_evidence("tdx", vector("tdx/quote.bin"), {"--collateral": "tdx/collateral.json"})
    sgx = broker_evidence("sgx", vector("sgx/quote.bin"), {"--collateral": "sgx/collateral.json"})
    tdx_time = datetime.fromisoformat("2025-06-19T12:16:03+00:00")
    assert evidence_appraisal.verify("tdx", tdx, anchors, tdx_time).evidence_type == "tdx"
    with pytest.raises(Problem, match="not rooted in a trusted CA"):
        evidence_appraisal.verify("sgx", sgx, anchors, datetime.fromisoformat("2025-06-19T12:56:11+00:00"))


def test_broker_takes_what_cove_verify_takes():
    """A PEM VCEK, and a TPM event log that is replayed against the quoted PCRs (here it does not match)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from cove.attest import verifier
    from cove.attest.errors import VerificationError
    from tests.attest.eventlog_writer import log

    pem = x509.load_der_x509_certificate(vector("snp/vcek.der")).public_bytes(Encoding.PEM)
    snp = {"report": b64(vector("snp/report.bin")), "vcek": b64(pem)}
    when = datetime.fromisoformat("2026-01-01T00:00:00+00:00")
    assert evidence_appraisal.verify("snp", snp, evidence_appraisal.TrustAnchors(), when).evidence_type == "snp"

    events = log([(16, b"not what the quote says")])
    tpm = broker_evidence(
        "tpm", vector("tpm/quote_attest.bin"), {"--tpm-sig": "tpm/quote_sig.bin", "--tpm-pcrs": "tpm/quote_pcrs.bin"}
    )
    anchors = evidence_appraisal.TrustAnchors(tpm_aks=[vector("tpm/ak_pub.pem")])
    assert evidence_appraisal.verify("tpm", tpm, anchors, when).evidence_type == "tpm"
    with pytest.raises(Problem) as refused:
        evidence_appraisal.verify("tpm", dict(tpm, event_log=b64(events)), anchors, when)
    inputs = verifier.Inputs(
        tpm_signature=vector("tpm/quote_sig.bin"),
        tpm_pcrs=vector("tpm/quote_pcrs.bin"),
        ak=vector("tpm/ak_pub.pem"),
        event_log=events,
    )
    with pytest.raises(VerificationError) as direct:
        verifier.verify(vector("tpm/quote_attest.bin"), inputs=inputs, now=when)
    assert refused.value.detail == direct.value.line()
