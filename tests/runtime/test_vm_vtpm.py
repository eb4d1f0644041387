"""The vm backend's vTPM: a real swtpm, provisioned and quoted, and evidence that binds its quote.

No guest boots here (tests/e2e/test_vm.py boots one): the launcher's side of
the vTPM is exercised with the platform key of a self-certified platform, and
every way to alter, strip, move or replay the vTPM quote is refused.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cbor2
import pytest

from cove.attest import evidence as ev
from cove.attest.cove_evidence_verify import appraisal, verify_cove_evidence
from cove.attest.errors import VerificationError
from cove.attest.policy import evaluate, parse_policy
from cove.platform import monitor
from cove.platform.reports import EnclaveClaims, ReportSigner
from cove.platform.state import Paths
from cove.runtime.vm import serve_attestation
from cove.runtime.vm_vtpm import Vtpm
from tests.conftest import require

LAUNCH = bytes(range(32))


def claims(backend: str = "vm") -> EnclaveClaims:
    isolation = "vm (tcg, emulated)" if backend == "vm" else "namespaces+seccomp"
    return EnclaveClaims(b"\x01" * 32, b"\x02" * 32, 0, 0, False, backend, isolation, "instance-1")


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> ReportSigner:
    folder = tmp_path_factory.mktemp("platform")
    return monitor.signer(Paths(folder))


@pytest.fixture(scope="module")
def vtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vtpm]:
    for tool in ("swtpm", "socat", "tpm2_quote"):
        require(tool)
    # a deep folder, as a run's private folder can be: the socket path must not be limited by it
    parent = tmp_path_factory.mktemp("vtpm") / ("deep" * 20)
    parent.mkdir()
    started = Vtpm.start(parent)
    started.provision(LAUNCH)
    yield started
    started.stop()
    assert os.listdir(parent) == []  # no state, socket or log left behind
    assert started.process.poll() is not None


def now() -> datetime:
    return datetime.now(timezone.utc)


def vm_evidence(signer: ReportSigner, vtpm: Vtpm, data: bytes = b"\x03" * 64, backend: str = "vm") -> bytes:
    return signer.evidence(claims(backend), data, vtpm.quoter(signer))


def edit(evidence: bytes, change: Any) -> bytes:
    document = cbor2.loads(evidence)
    change(document)
    return cbor2.dumps(document, canonical=True)


def test_vm_evidence_binds_the_vtpm_quote_of_the_launch_pcr(signer: ReportSigner, vtpm: Vtpm) -> None:
    verified = verify_cove_evidence(vm_evidence(signer, vtpm), now())
    assert verified.launch == LAUNCH and verified.report.backend == "vm"
    assert verified.vtpm is not None and verified.vtpm.pcrs["sha256"][ev.LAUNCH_PCR] == ev.launch_pcr_value(LAUNCH)
    assert appraisal(verified).launch_measurement == LAUNCH


def _strip(d: dict[str, Any]) -> None:
    del d["vtpm"]


def _other_pcr_value(d: dict[str, Any]) -> None:
    d["vtpm"]["pcrs"] = {"sha256": {ev.LAUNCH_PCR: bytes(32)}}


def _flip_attest(d: dict[str, Any]) -> None:
    d["vtpm"]["attest"] = d["vtpm"]["attest"][:-1] + bytes([d["vtpm"]["attest"][-1] ^ 1])


def _other_launch(d: dict[str, Any]) -> None:
    statement = cbor2.loads(d["vtpm"]["statement"])
    statement["launch"] = bytes(32)
    d["vtpm"]["statement"] = cbor2.dumps(statement, canonical=True)


def _extra_key(d: dict[str, Any]) -> None:
    d["vtpm"]["extra"] = b""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_strip, "vm report without its vTPM quote"),
        (_other_pcr_value, "vTPM PCR digest mismatch"),
        (_flip_attest, "signature"),
        (_other_launch, "vTPM statement signature"),
        (_extra_key, "unknown field"),
    ],
)
def test_altered_vtpm_quote_refused(signer: ReportSigner, vtpm: Vtpm, change: Any, message: str) -> None:
    with pytest.raises(VerificationError, match=message):
        verify_cove_evidence(edit(vm_evidence(signer, vtpm), change), now())


def test_vtpm_quote_moved_to_another_report_refused(signer: ReportSigner, vtpm: Vtpm) -> None:
    first = cbor2.loads(vm_evidence(signer, vtpm, b"\x04" * 64))
    second = cbor2.loads(vm_evidence(signer, vtpm, b"\x05" * 64))
    second["vtpm"] = first["vtpm"]  # a replayed quote: its qualifying data names the first report
    with pytest.raises(VerificationError, match="extraData"):
        verify_cove_evidence(cbor2.dumps(second, canonical=True), now())


def test_a_vtpm_statement_goes_only_with_its_runs_reports(signer: ReportSigner, vtpm: Vtpm) -> None:
    """R3 H1's splice: another run's report, this run's certified statement, and a quote by this
    vTPM's AK over that report (what a guest holding the AK could make) is refused by the run binding."""
    other = EnclaveClaims(b"\x01" * 32, b"\x02" * 32, 0, 0, False, "vm", "vm (tcg, emulated)", "instance-x")
    spliced = cbor2.loads(signer.evidence(other, b"\x06" * 64))
    ours = cbor2.loads(vm_evidence(signer, vtpm))
    attest, signature, _ = vtpm.quote(ev.vm_quote_qualifier(spliced["report"]))
    spliced["vtpm"] = dict(ours["vtpm"], attest=attest, signature=signature)
    with pytest.raises(VerificationError, match="certified for another run"):
        verify_cove_evidence(cbor2.dumps(spliced, canonical=True), now())
    assert cbor2.loads(ours["vtpm"]["statement"])["instance_id"] == "instance-1"


def test_sim_report_with_a_vtpm_quote_refused(signer: ReportSigner, vtpm: Vtpm) -> None:
    with pytest.raises(VerificationError, match="a sim report carries a vTPM quote"):
        verify_cove_evidence(vm_evidence(signer, vtpm, backend="sim"), now())


def test_launch_measurement_policy(signer: ReportSigner, vtpm: Vtpm, tmp_path: Path) -> None:
    vm = appraisal(verify_cove_evidence(vm_evidence(signer, vtpm), now()))
    sim = appraisal(verify_cove_evidence(signer.evidence(claims("sim"), b"\x03" * 64), now()))

    def policy(launch: bytes) -> Any:
        path = tmp_path / "policy.toml"
        path.write_text(f'[cove]\nself_certified = true\nlaunch_measurements = ["{launch.hex()}"]\n')
        return parse_policy(path.read_text())

    assert evaluate(policy(LAUNCH), vm).accepted
    refused = evaluate(policy(bytes(32)), vm)
    assert not refused.accepted and any("vm launch measurement" in r for r in refused.reasons)
    without = evaluate(policy(LAUNCH), sim)  # sim evidence has no vTPM: a launch policy refuses it
    assert not without.accepted and any("absent (no vTPM quote)" in r for r in without.reasons)


def test_attestation_port_answers_each_kind_and_nothing_else(signer: ReportSigner, vtpm: Vtpm) -> None:
    """The host's side of the guest's cove.attest port, over a real socket pair (no boot)."""
    host, guest = socket.socketpair()
    makers = {b"Q": functools.partial(signer.evidence, vtpm=vtpm.quoter(signer)), b"R": signer.signed_report}
    server = threading.Thread(target=serve_attestation, args=(host, makers, claims()), daemon=True)
    server.start()

    def ask(kind: bytes, data: bytes) -> bytes:
        guest.sendall(kind + data)
        (length,) = struct.unpack("<I", guest.recv(4, socket.MSG_WAITALL))
        return guest.recv(length, socket.MSG_WAITALL) if length else b""

    data = os.urandom(64)
    quote = verify_cove_evidence(ask(b"Q", data), now())
    assert quote.report.report_data == data and quote.launch == LAUNCH
    assert ev.parse_report(cbor2.loads(ask(b"R", data))["report"]).report_data == data
    assert ask(b"X", data) == b""  # an unknown kind: nothing, and the port still answers
    assert ask(b"R", bytes(64)) != b""
    guest.sendall(b"Q" + bytes(10))  # a request cut short, then the guest is gone: the server ends
    guest.close()
    server.join(timeout=10)
    assert not server.is_alive()
    host.close()
