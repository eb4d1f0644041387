"""The TPM-rooted platform with real swtpms: key sealing, AK certification, quotes, and every way to reject.

Nothing is simulated: each platform has its own swtpm (EK certificate from
its own local CA), its AK is certified by credential activation, and the
evidence checked here is what /dev/attestation would serve.
"""

from __future__ import annotations

import hashlib
import os
import stat
from datetime import datetime, timezone

import cbor2
import pytest

from cove.attest import evidence as ev
from cove.attest.ak_ca import AkCa
from cove.attest.cove_evidence_verify import verify_cove_evidence
from cove.attest.errors import VerificationError
from cove.attest.policy import parse_policy
from cove.attest.verifier import appraise
from cove.errors import CoveError
from cove.platform import endorse, monitor, pak
from cove.platform.reports import EnclaveClaims, ReportSigner
from cove.platform.runtime_measurement import runtime_hash
from cove.platform.swtpm import SwTpm
from cove.platform.tpm2 import Tpm, TpmError
from tests.platform.conftest import ak_root, ek_root

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
RD = hashlib.sha512(b"nonce").digest()


def policy_for(paths, *, pcrs=None, ek=None, ak=None, extra=""):
    (paths.dir / "ek-root.pem").write_bytes(ek or ek_root(paths))
    (paths.dir / "ak-root.pem").write_bytes(ak or ak_root(paths))
    lines = [
        f'[cove]\nek_ca = ["{paths.dir}/ek-root.pem"]\nak_ca = ["{paths.dir}/ak-root.pem"]',
        f'runtime_hashes = ["{runtime_hash().hex()}"]',
        extra,
    ]
    if pcrs is not None:
        lines.append("[cove.pcrs.sha256]")
        lines += [f'{i} = "{v.hex()}"' for i, v in sorted(pcrs.items())]
    return parse_policy("\n".join(lines) + "\n")


def expected_pcrs(paths) -> dict[int, bytes]:
    spki = paths.pak_public.read_bytes()
    values = {i: bytes(32) for i in ev.BOOT_PCRS}
    values[23] = ev.platform_pcr_value(runtime_hash(), ev.pak_hash(spki))
    return values


def evidence_of(paths) -> bytes:
    return monitor.signer(paths).evidence(CLAIMS, RD)


def resign(paths, evidence: bytes, **fields) -> bytes:
    """Evidence whose endorsement.tpm fields are replaced, re-signed with this platform's own key.

    This is the strongest forger: the platform's root, holding its platform key,
    pairing it with a quote or keys from elsewhere.
    """
    emap = cbor2.loads(cbor2.loads(evidence)["endorsement"])
    emap["tpm"].update(fields)
    key = pak.load(paths, Tpm(paths.read_config().tcti))
    return ReportSigner(key, ev.parse_endorsement(emap)).evidence(CLAIMS, RD)


def tpm_fields(evidence: bytes) -> dict:
    return cbor2.loads(cbor2.loads(evidence)["endorsement"])["tpm"]


def test_init_seals_the_platform_key_in_the_tpm(tpm_platforms):
    paths = tpm_platforms.make()
    assert not paths.pak.exists(), "with a TPM the private key must not be kept in a file"
    for sealed in (paths.pak_sealed_pub, paths.pak_sealed_priv, paths.config):
        assert stat.S_IMODE(os.stat(sealed).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(paths.dir).st_mode) == 0o700
    state = monitor.status(paths)
    assert state["root"] == "tpm" and state["current"] and state["tpm"]["pcr_matches_quote"]
    assert state["tpm"]["ek_issuer"] == "CN=swtpm-localca"
    assert state["platform_key"] == hashlib.sha256(paths.pak_public.read_bytes()).hexdigest()


def test_tpm_rooted_evidence_accepted_when_pcrs_match(tpm_platforms):
    paths = tpm_platforms.make()
    evidence = evidence_of(paths)
    verdict = appraise(evidence, policy_for(paths, pcrs=expected_pcrs(paths)), report_data=RD)
    assert verdict.accepted, verdict.result.reasons
    a = verdict.appraisal
    assert a.platform_root == "tpm" and a.measurement == CLAIMS.measurement and a.runtime == runtime_hash()
    assert set(a.pcrs["sha256"]) == set(range(8)) | {23}
    assert verdict.result.components == {"platform": "affirming", "enclave": "affirming"}


def test_rejected_after_unexpected_boot_pcr_extend(tpm_platforms):
    paths = tpm_platforms.make()
    policy = policy_for(paths, pcrs=expected_pcrs(paths))
    before = evidence_of(paths)
    Tpm(paths.read_config().tcti).extend(7, hashlib.sha256(b"an unexpected boot component").digest())
    monitor.init(monitor.InitOptions(tpm="swtpm"), paths)  # the next epoch quotes the boot state as it is
    after = evidence_of(paths)
    assert appraise(before, policy, report_data=RD).accepted
    verdict = appraise(after, policy, report_data=RD)
    assert not verdict.accepted
    assert [r for r in verdict.result.reasons if r.startswith("PCR sha256:7 is ")], verdict.result.reasons
    assert verdict.result.components["platform"] == "contraindicated"


def test_unexpected_extend_of_coves_pcr(tpm_platforms):
    paths = tpm_platforms.make()
    config = paths.read_config()
    tpm = Tpm(config.tcti)
    tpm.extend(config.pcr, hashlib.sha256(b"someone else").digest())
    assert monitor.status(paths)["tpm"]["pcr_matches_quote"] is False
    # A quote taken now, with the right qualifying data, shows the foreign extend: refused.
    e = endorse.load(paths)
    attest, signature, pcr_file = tpm.quote(
        config.ak_handle,
        sorted(set(ev.BOOT_PCRS) | {23}),
        ev.quote_qualifier(e.pak, e.runtime, e.epoch, e.epoch_start_ms),
    )
    from cove.attest.tpm_structs import parse_pcr_file

    forged = resign(
        paths, evidence_of_without_refresh(paths), attest=attest, signature=signature, pcrs=parse_pcr_file(pcr_file)
    )
    with pytest.raises(VerificationError, match="PCR sha256:23 does not hold the runtime and platform key"):
        verify_cove_evidence(forged, datetime.now(timezone.utc), ek_roots=ek_root(paths), ak_roots=ak_root(paths))
    # The monitor notices and opens a new epoch before signing again.
    fresh = evidence_of(paths)
    assert cbor2.loads(cbor2.loads(fresh)["endorsement"])["epoch"] != e.epoch
    assert appraise(fresh, policy_for(paths, pcrs=expected_pcrs(paths)), report_data=RD).accepted


def evidence_of_without_refresh(paths) -> bytes:
    """Evidence signed with the stored endorsement as it is (no staleness check)."""
    config = paths.read_config()
    key = pak.load(paths, Tpm(config.tcti))
    return ReportSigner(key, endorse.load(paths)).evidence(CLAIMS, RD)


def test_ek_chain_not_rooted_in_the_configured_ca(tpm_platforms):
    a, b = tpm_platforms.make("a"), tpm_platforms.make("b")
    evidence = evidence_of(a)
    with pytest.raises(VerificationError, match="EK certificate chain is not rooted in a trusted CA"):
        appraise(evidence, policy_for(a, ek=ek_root(b)))
    with pytest.raises(VerificationError, match="AK certificate chain is not rooted in a trusted CA"):
        appraise(evidence, policy_for(a, ak=ak_root(b)))
    with pytest.raises(VerificationError, match="needs trusted EK CA and AK CA"):
        appraise(evidence)  # the default policy names no TPM roots


@pytest.fixture
def shared_ca_pair(tpm_platforms, tmp_path):
    """Two TPM platforms whose AKs one AK CA certified (it trusts both swtpm CAs)."""
    a = tpm_platforms.make("a", ak_ca=None)
    roots = ek_root(a)
    b_paths = tpm_platforms.make("b")
    roots += ek_root(b_paths)
    ca_dir = tmp_path / "shared-ak-ca"
    AkCa.create(ca_dir, roots)
    monitor.init(monitor.InitOptions(tpm="swtpm", ak_ca=ca_dir, force=True), a)
    monitor.init(monitor.InitOptions(tpm="swtpm", ak_ca=ca_dir, force=True), b_paths)
    return a, b_paths, ca_dir


def test_quote_from_another_tpm_is_rejected(shared_ca_pair):
    a, b, ca_dir = shared_ca_pair
    ea, eb = evidence_of(a), evidence_of(b)
    now = datetime.now(timezone.utc)
    roots = dict(ek_roots=ek_root(a) + ek_root(b), ak_roots=(ca_dir / "ca.pem").read_bytes())
    assert verify_cove_evidence(ea, now, **roots).root == "tpm"
    assert verify_cove_evidence(eb, now, **roots).root == "tpm"
    ta, tb = tpm_fields(ea), tpm_fields(eb)
    cases = {
        "quote signature invalid": dict(attest=tb["attest"], signature=tb["signature"], pcrs=tb["pcrs"]),
        "AK certificate binds the AK to another TPM's EK": dict(
            attest=tb["attest"], signature=tb["signature"], pcrs=tb["pcrs"], ak=tb["ak"], ak_chain=tb["ak_chain"]
        ),
        "extraData does not match": dict(tb),
        "AK certificate is for another attestation key": dict(ak=tb["ak"]),
    }
    for reason, fields in cases.items():
        with pytest.raises(VerificationError, match=reason):
            verify_cove_evidence(resign(a, ea, **fields), now, **roots)
    assert ta["ek_chain"] != tb["ek_chain"]
    # Without the platform key, any change to the endorsement breaks the report's signature binding.
    doc = cbor2.loads(ea)
    emap = cbor2.loads(doc["endorsement"])
    emap["tpm"].update(attest=tb["attest"])
    doc["endorsement"] = cbor2.dumps(emap, canonical=True)
    with pytest.raises(VerificationError, match="signed for another endorsement"):
        verify_cove_evidence(cbor2.dumps(doc, canonical=True), now, **roots)


def test_credential_activation_needs_the_ek_s_own_tpm(tpm_platforms, tmp_path):
    a, b = tpm_platforms.make("a"), tpm_platforms.make("b")
    ca = AkCa.create(tmp_path / "ca", ek_root(a) + ek_root(b))
    tpm_a, tpm_b = Tpm(a.read_config().tcti), Tpm(b.read_config().tcti)
    now = datetime.now(timezone.utc)
    chain_a = endorse.pem_to_der(a.ek_chain.read_bytes())
    handle = a.read_config().ak_handle
    # B's AK presented with A's EK: only A's TPM could decrypt, and it does not hold that AK.
    challenge = ca.challenge(chain_a, b.ak_public.read_bytes(), now)
    with pytest.raises(TpmError):
        tpm_b.activate_credential(handle, challenge.credential)
    with pytest.raises(TpmError):
        tpm_a.activate_credential(handle, challenge.credential)
    # The honest pairing activates, and only the recovered secret earns a certificate.
    good = ca.challenge(chain_a, a.ak_public.read_bytes(), now, tpm_a.ek_public())
    with pytest.raises(VerificationError, match="credential activation failed"):
        ca.finish(good, b"\0" * 32, now)
    good = ca.challenge(chain_a, a.ak_public.read_bytes(), now, tpm_a.ek_public())
    secret = tpm_a.activate_credential(handle, good.credential)
    chain = ca.finish(good, secret, now)
    with pytest.raises(VerificationError, match="credential activation failed"):
        ca.finish(good, secret, now)  # one certificate per challenge
    assert len(chain) == 2


def test_ak_ca_refuses_an_ek_it_does_not_trust(tpm_platforms, tmp_path):
    a, b = tpm_platforms.make("a"), tpm_platforms.make("b")
    ca = AkCa.create(tmp_path / "ca", ek_root(b))
    with pytest.raises(VerificationError, match="EK certificate chain is not rooted"):
        ca.challenge(endorse.pem_to_der(a.ek_chain.read_bytes()), a.ak_public.read_bytes(), datetime.now(timezone.utc))


def test_sealed_key_opens_only_in_its_tpm(tpm_platforms, tmp_path):
    a, b = tpm_platforms.make("a"), tpm_platforms.make("b")
    for name in ("pak.sealed.pub", "pak.sealed.priv", "pak.pub.der"):
        (b.dir / name).write_bytes((a.dir / name).read_bytes())
    with pytest.raises(CoveError):
        pak.load(b, Tpm(b.read_config().tcti))
    assert pak.spki(pak.load(a, Tpm(a.read_config().tcti))) == a.pak_public.read_bytes()


def test_swtpm_restart_opens_a_new_epoch_with_the_same_key(tpm_platforms):
    paths = tpm_platforms.make()
    key_before = paths.pak_public.read_bytes()
    epoch_before = endorse.load(paths).epoch
    SwTpm(paths.swtpm).stop()
    with pytest.raises(CoveError, match="not reachable"):
        monitor.signer(paths)
    monitor.init(monitor.InitOptions(tpm="swtpm"), paths)  # restarts the swtpm: PCRs are reset
    assert paths.pak_public.read_bytes() == key_before
    assert endorse.load(paths).epoch != epoch_before
    assert appraise(evidence_of(paths), policy_for(paths, pcrs=expected_pcrs(paths)), report_data=RD).accepted


def test_rotate_makes_a_new_key_and_keeps_the_ak(tpm_platforms):
    paths = tpm_platforms.make()
    key, ak = paths.pak_public.read_bytes(), paths.ak_public.read_bytes()
    monitor.init(monitor.InitOptions(tpm="swtpm", rotate=True), paths)
    assert paths.pak_public.read_bytes() != key and paths.ak_public.read_bytes() == ak
    monitor.init(monitor.InitOptions(tpm="swtpm", force=True), paths)
    assert paths.ak_public.read_bytes() != ak
    assert appraise(evidence_of(paths), policy_for(paths, pcrs=expected_pcrs(paths)), report_data=RD).accepted


def test_the_quote_is_per_epoch_not_per_report(tpm_platforms):
    paths = tpm_platforms.make()
    signer = monitor.signer(paths)
    first, second = signer.evidence(CLAIMS, RD), signer.evidence(CLAIMS, bytes(64))
    assert tpm_fields(first)["attest"] == tpm_fields(second)["attest"]
    assert cbor2.loads(first)["report"] != cbor2.loads(second)["report"]


def test_every_byte_of_tpm_rooted_evidence_is_covered(tpm_platforms):
    paths = tpm_platforms.make()
    evidence = evidence_of(paths)
    roots = dict(ek_roots=ek_root(paths), ak_roots=ak_root(paths))
    now = datetime.now(timezone.utc)
    assert verify_cove_evidence(evidence, now, **roots).root == "tpm"
    for i in range(len(evidence)):
        data = bytearray(evidence)
        data[i] ^= 0x20
        with pytest.raises(VerificationError):
            verify_cove_evidence(bytes(data), now, **roots)


def test_every_byte_of_the_quote_and_ak_is_checked(tpm_platforms):
    """Flip bytes of the TPM's own structures and re-sign as the platform: the TPM checks still catch it."""
    paths = tpm_platforms.make()
    evidence = evidence_of(paths)
    roots = dict(ek_roots=ek_root(paths), ak_roots=ak_root(paths))
    now = datetime.now(timezone.utc)
    fields = tpm_fields(evidence)
    key = pak.load(paths, Tpm(paths.read_config().tcti))
    emap = cbor2.loads(cbor2.loads(evidence)["endorsement"])
    for name in ("attest", "signature", "ak"):
        for i in range(len(fields[name])):
            changed = bytearray(fields[name])
            changed[i] ^= 0x01
            tpm = dict(emap["tpm"], **{name: bytes(changed)})
            try:
                forged = ReportSigner(key, ev.parse_endorsement(dict(emap, tpm=tpm))).evidence(CLAIMS, RD)
            except VerificationError:
                continue
            with pytest.raises(VerificationError):
                verify_cove_evidence(forged, now, **roots)
