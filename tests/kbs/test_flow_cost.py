"""What the broker's per-flow savings must not change: the work pool's hand-offs, the platform key's
cache, the runtime-data binding's single canonical form, the claims' JSON."""

from __future__ import annotations

import asyncio
import enum
import hashlib
import threading
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cove.attest import appraisal
from cove.attest.cove_evidence_verify import load_platform_key
from cove.attest.errors import VerificationError
from cove.kbs import coco_binding, evidence_appraisal
from cove.kbs.problems import Problem
from cove.kbs.server import OffLoop


# -- the work pool ---------------------------------------------------------------------------------
def test_pool_answers_raises_and_runs_in_its_threads() -> None:
    pool = OffLoop(threads=3)

    async def main() -> None:
        names = await asyncio.gather(*(pool(lambda: threading.current_thread().name) for _ in range(20)))
        assert all(name.startswith("cove-kbs_") for name in names), names
        assert await pool(pow, 2, 10) == 1024
        with pytest.raises(Problem, match="refused"):
            await pool(_raise, Problem("PolicyDeny", "refused"))
        with pytest.raises(RuntimeError, match="StopIteration"):  # a future cannot carry it as it is
            await asyncio.wait_for(pool(_raise, StopIteration()), 10)  # (it left the request waiting forever)

    try:
        asyncio.run(main())
        assert len(pool._threads) <= 3  # never more threads than asked for, however many requests wait
    finally:
        pool.close()


def test_pool_skips_work_whose_request_was_cancelled_and_refuses_work_once_closed() -> None:
    pool = OffLoop(threads=1)
    ran: list[int] = []
    gate = threading.Event()

    async def main() -> None:
        first = asyncio.ensure_future(pool(gate.wait, 10))  # holds the only thread
        second = asyncio.ensure_future(pool(ran.append, 2))
        await asyncio.sleep(0.05)
        second.cancel()  # its client went away before a thread took it
        await asyncio.sleep(0)
        gate.set()
        assert await first is True
        assert await pool(ran.append, 3) is None
        assert ran == [3]

    try:
        asyncio.run(main())
    finally:
        pool.close()
    deadline = time.monotonic() + 5
    while any(t.is_alive() for t in pool._threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.is_alive() for t in pool._threads), "close() leaves the pool's threads running"

    async def after() -> None:
        with pytest.raises(RuntimeError, match="closed"):
            await pool(ran.append, 4)

    asyncio.run(after())
    assert ran == [3]


def _raise(exc: BaseException) -> None:
    raise exc


# -- the platform key ------------------------------------------------------------------------------
def _spki() -> bytes:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def test_platform_key_is_parsed_once_per_key_and_a_bad_one_fails_every_time() -> None:
    one, other = _spki(), _spki()
    assert load_platform_key(one) is load_platform_key(bytes(one))  # parsed once, by its bytes
    assert load_platform_key(other) is not load_platform_key(one)
    assert (
        load_platform_key(other).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == other
    )
    tampered = one[:-1] + bytes([one[-1] ^ 1])  # a point off the curve
    for _ in range(2):  # a failure is not remembered as a key
        with pytest.raises(VerificationError, match="platform key"):
            load_platform_key(tampered)
    p384 = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    for _ in range(2):
        with pytest.raises(VerificationError, match="P-256"):
            load_platform_key(p384)


# -- the runtime-data binding ----------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", coco_binding.SELECTABLE)
def test_binding_canonicalizes_runtime_data_once(monkeypatch: pytest.MonkeyPatch, algorithm: str) -> None:
    sent = {"nonce": "bm9uY2U=", "tee-pubkey": {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AQ"}}
    runtime = coco_binding.primary_runtime_data(sent)  # what the broker checks the report data against
    report_data = evidence_appraisal.expected_report_data(runtime, algorithm)
    made: list[object] = []
    canonical = coco_binding.canonical
    monkeypatch.setattr(coco_binding, "canonical", lambda value: made.append(value) or canonical(value))
    assert evidence_appraisal.check_binding(report_data, runtime) == algorithm
    assert len(made) == 1, "the canonical form was made once per hash algorithm tried"
    other = dict(runtime, nonce="b3RoZXI=")
    with pytest.raises(Problem) as refused:
        evidence_appraisal.check_binding(report_data, other)
    assert refused.value.kind == "EvidenceBinding"
    padded = hashlib.new(algorithm, canonical(runtime)).digest() + b"\x01" * 8  # bytes after the hash
    with pytest.raises(Problem):
        evidence_appraisal.check_binding(padded, runtime)


# -- the claims' JSON ------------------------------------------------------------------------------
class _Level(enum.IntEnum):
    HIGH = 3


class _Name(str):
    pass


def test_claims_json_keeps_every_leaf_as_before() -> None:
    value = {
        "s": "x",
        "i": 7,
        "f": 1.5,
        "b": True,
        "n": None,
        "level": _Level.HIGH,
        "name": _Name("y"),
        "raw": b"\x01\x02",
        "nested": [{"k": b"\xff"}, (1, "a")],
    }
    out = appraisal.jsonable(value)
    assert out == {
        "s": "x",
        "i": 7,
        "f": 1.5,
        "b": True,
        "n": None,
        "level": 3,
        "name": "y",
        "raw": "0102",
        "nested": [{"k": "ff"}, [1, "a"]],
    }
    assert type(out["level"]) is _Level and type(out["name"]) is _Name  # subclasses pass as they are
