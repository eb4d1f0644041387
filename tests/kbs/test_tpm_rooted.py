"""TPM-rooted Cove evidence through the broker: real swtpms, real HTTPS on loopback.

The broker's attestation policy requires a TPM (self-certified is refused, as
by default), trusts one swtpm's EK CA and AK CA, and pins that TPM's EK
certificate and AK. Evidence comes from the platform monitor, exactly what
/dev/attestation serves an enclave; the forgeries are made by the strongest
forger, a host holding the platform key and re-signing (tests/platform).
"""

from __future__ import annotations

import base64
import hashlib

import cbor2
import pytest

from cove.attest import evidence as ev
from cove.attest.tpm_structs import parse_public
from cove.kbs.client import KbsError
from cove.platform import endorse, monitor, pak
from cove.platform.reports import EnclaveClaims, ReportSigner
from cove.platform.state import Paths
from cove.platform.tpm2 import Tpm
from tests.kbs.conftest import problem
from tests.platform.conftest import TpmPlatforms, ak_root, ek_root

CLAIMS = EnclaveClaims(
    measurement=b"\x5a" * 32,
    signer=b"\x51" * 32,
    product_id=3,
    svn=2,
    debug=False,
    backend="sim",
    isolation="namespaces+seccomp",
    instance_id="0123456789abcdef",
)


class PlatformEvidence:
    """Cove evidence for CLAIMS from a platform folder; ``tamper`` rewrites the endorsement's TPM fields."""

    tee = "cove"

    def __init__(self, paths: Paths, tamper=None):
        self.paths, self.tamper = paths, tamper

    def evidence(self, report_data: bytes) -> dict:
        signer = monitor.signer(self.paths)
        if self.tamper is not None:
            emap = cbor2.loads(cbor2.loads(signer.evidence(CLAIMS, report_data))["endorsement"])
            emap["tpm"] = self.tamper(dict(emap["tpm"]))
            key = pak.load(self.paths, Tpm(self.paths.read_config().tcti))
            signer = ReportSigner(key, ev.parse_endorsement(emap))
        return {"evidence": base64.b64encode(signer.evidence(CLAIMS, report_data)).decode()}


def ek_sha256(paths: Paths) -> str:
    return hashlib.sha256(endorse.pem_to_der(paths.ek_chain.read_bytes())[0]).hexdigest()


def ak_name(paths: Paths) -> str:
    return parse_public(paths.ak_public.read_bytes()).name.hex()


def toml_pem(pem: bytes) -> str:
    return '"""' + pem.decode() + '"""'


def tpm_policy(trusted: list[Paths], pinned: Paths | None = None) -> str:
    """TPM-rooted Cove evidence only: these platforms' CAs, and (optionally) exactly this TPM and AK."""
    ek = ", ".join(toml_pem(ek_root(p)) for p in trusted)
    ak = ", ".join(toml_pem(ak_root(p)) for p in trusted)
    text = f'types = ["cove"]\n[cove]\nek_ca = [{ek}]\nak_ca = [{ak}]\n'
    if pinned is not None:
        text += f'ek_certificates = ["{ek_sha256(pinned)}"]\nak_names = ["{ak_name(pinned)}"]\n'
    return text


@pytest.fixture
def tpm_platforms(tmp_path):
    platforms = TpmPlatforms(tmp_path)
    yield platforms
    platforms.stop_all()


@pytest.fixture
def tpm_a(tpm_platforms):
    return tpm_platforms.make("a")


def release_by_measurement(kbs, path: str, value: bytes, extra: str = "") -> None:
    kbs.admin.put_policy("app", f'types = ["cove"]\n[cove]\nmeasurements = ["{CLAIMS.measurement.hex()}"]\n' + extra)
    kbs.admin.create_secret(path, "data", "app", value=value)


def attest_refused(kbs, provider) -> KbsError:
    with pytest.raises(KbsError) as caught:
        kbs.client().attest(provider)
    return caught


def test_tpm_rooted_evidence_released(tpm_a, make_kbs):
    kbs = make_kbs(policy=tpm_policy([tpm_a], pinned=tpm_a))
    # The release policy may pin the TPM too: the claims survive the session and the token.
    release_by_measurement(
        kbs,
        "app/db/password",
        b"rooted in a TPM",
        f'ek_certificates = ["{ek_sha256(tpm_a)}"]\nak_names = ["{ak_name(tpm_a)}"]\n',
    )
    client = kbs.client()
    client.attest(PlatformEvidence(tpm_a))
    claims = client.claims["tcb-status"]
    assert claims["platform_root"] == "tpm"
    assert claims["ek_certificate"] == ek_sha256(tpm_a) and claims["ak_name"] == ak_name(tpm_a)
    assert claims["pcrs"]["sha256"][str(ev.DEFAULT_PCR)]
    assert client.resource("app/db/password") == b"rooted in a TPM"
    assert client.resource("app/db/password", bearer=True) == b"rooted in a TPM"


def test_self_certified_refused_by_a_tpm_policy(tpm_a, make_kbs, tmp_path):
    kbs = make_kbs(policy=tpm_policy([tpm_a]))
    plain = Paths(tmp_path / "self-certified")
    monitor.init(monitor.InitOptions(tpm="none"), plain)
    caught = attest_refused(kbs, PlatformEvidence(plain))
    assert problem(caught) == (401, "AttestationDeny")
    assert "self-certified" in str(caught.value)


def test_evidence_of_another_tpm_refused(tpm_platforms, tpm_a, make_kbs):
    other = tpm_platforms.make("b")
    # The policy trusts only A's CAs: B's EK certificate does not chain.
    caught = attest_refused(make_kbs(policy=tpm_policy([tpm_a])), PlatformEvidence(other))
    assert problem(caught) == (401, "EvidenceInvalid")
    assert "EK certificate chain is not rooted in a trusted CA" in str(caught.value)
    # Both CAs are trusted, but the policy pins A's TPM and AK: B's valid evidence is denied.
    pinned = make_kbs(policy=tpm_policy([tpm_a, other], pinned=tpm_a))
    caught = attest_refused(pinned, PlatformEvidence(other))
    assert problem(caught) == (401, "AttestationDeny")
    assert f"TPM EK certificate {ek_sha256(other)} is not one the policy accepts" in str(caught.value)
    assert f"TPM attestation key {ak_name(other)} is not one" in str(caught.value)
    release_by_measurement(pinned, "app/k/v", b"for A only")
    client = pinned.client()
    client.attest(PlatformEvidence(tpm_a))
    assert client.resource("app/k/v") == b"for A only"


def test_tampered_tpm_quote_refused(tpm_platforms, tpm_a, make_kbs):
    kbs = make_kbs(policy=tpm_policy([tpm_a]))

    def flip(field: str, index: int):
        def tamper(tpm: dict) -> dict:
            changed = bytearray(tpm[field])
            changed[index] ^= 0x01
            return dict(tpm, **{field: bytes(changed)})

        return tamper

    for tamper in (flip("attest", -1), flip("attest", 40), flip("signature", -5)):
        caught = attest_refused(kbs, PlatformEvidence(tpm_a, tamper))
        assert problem(caught) == (401, "EvidenceInvalid"), caught.value
        assert "quote signature invalid" in str(caught.value)
    # A genuine quote of another TPM, spliced in by a host that holds A's platform key.
    other = monitor.signer(tpm_platforms.make("b")).evidence(CLAIMS, bytes(64))
    theirs = cbor2.loads(cbor2.loads(other)["endorsement"])["tpm"]
    caught = attest_refused(
        kbs,
        PlatformEvidence(
            tpm_a, lambda tpm: dict(tpm, attest=theirs["attest"], signature=theirs["signature"], pcrs=theirs["pcrs"])
        ),
    )
    assert problem(caught) == (401, "EvidenceInvalid")
    assert "quote signature invalid" in str(caught.value)
