"""Structure-aware fuzzing of TPM-rooted evidence: mutated quotes, keys and chains, re-signed by the platform key.

Re-signing gets each mutation past the report signature, into the quote,
AK and certificate-chain checks; only VerificationError may come out.
"""

from __future__ import annotations

from datetime import datetime, timezone

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cove.attest import evidence as ev
from cove.attest.cove_evidence_verify import verify_cove_evidence
from cove.attest.errors import VerificationError
from cove.platform import monitor, pak
from cove.platform.reports import EnclaveClaims, ReportSigner
from cove.platform.state import Paths
from cove.platform.swtpm import SwTpm
from cove.platform.tpm2 import Tpm
from tests.conftest import require

CLAIMS = EnclaveClaims(b"\x01" * 32, b"\x02" * 32, 0, 0, False, "sim", "namespaces+seccomp", "fuzz")
FIELDS = ("attest", "signature", "ak", "ak_chain", "ek_chain")


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    require("swtpm")
    require("tpm2_quote")
    paths = Paths(tmp_path_factory.mktemp("fuzz") / "platform")
    try:
        monitor.init(monitor.InitOptions(tpm="swtpm"), paths)
        key = pak.load(paths, Tpm(paths.read_config().tcti))
        evidence = monitor.signer(paths).evidence(CLAIMS, bytes(64))
        roots = dict(ek_roots=SwTpm(paths.swtpm).ek_roots_pem(), ak_roots=(paths.local_ak_ca / "ca.pem").read_bytes())
        yield key, cbor2.loads(cbor2.loads(evidence)["endorsement"]), roots
    finally:
        SwTpm(paths.swtpm).stop()


def _mutate(value, pos: int, byte: int, cut: int):
    if isinstance(value, (list, tuple)):
        items = list(value)
        i = pos % len(items)
        items[i] = _mutate(items[i], pos // len(items), byte, cut)
        return items
    data = bytearray(value)
    data[pos % len(data)] ^= byte or 0x01  # always a change
    return bytes(data[: max(1, cut % (len(data) + 1))]) if cut else bytes(data)


@settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    st.sampled_from(FIELDS),
    st.integers(0, 1 << 20),
    st.integers(1, 255),
    st.integers(0, 4000),
    st.sampled_from([0, 1, 2, 3, 7, 8, 16, 23]),
)
def test_mutated_tpm_endorsements(platform, field, pos, byte, cut, pcr):
    key, emap, roots = platform
    tpm = dict(emap["tpm"])
    tpm[field] = _mutate(tpm[field], pos, byte, cut)
    if cut % 5 == 0:
        tpm["pcr"] = pcr
    try:
        endorsement = ev.parse_endorsement(dict(emap, tpm=tpm))
        evidence = ReportSigner(key, endorsement).evidence(CLAIMS, bytes(64))
    except VerificationError:
        return
    with pytest.raises(VerificationError):
        verify_cove_evidence(evidence, datetime.now(timezone.utc), **roots)
