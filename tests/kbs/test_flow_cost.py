"""What the broker's per-flow savings must not change: the work pool's hand-offs, the platform key's
cache, the runtime-data binding's single canonical form, the claims' JSON."""

from __future__ import annotations

import asyncio
import enum
import hashlib
import threading
import time

import pytest
import rfc8785
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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


# -- RFC 8785 for runtime-data ---------------------------------------------------------------------
_ascii = st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=12)
_any_text = st.text(max_size=8)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 60), max_value=1 << 60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _ascii
    | _any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_ascii | _any_text, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_json)
def test_runtime_data_canonical_form_is_rfc8785_byte_for_byte(value: object) -> None:
    try:
        expected = rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError):
        with pytest.raises(Problem):
            coco_binding.canonical(value)
        return
    assert coco_binding.canonical(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        {"nonce": 'a\x00\x01\x08\t\n\x0b\x0c\r\x1f\x7f"\\/', "n": [(1 << 53) - 1, -((1 << 53) - 1), 0, True, None]},
        {"big": 1 << 53, "neg": -(1 << 53)},  # past the plain path: refused by rfc8785
        {"b": 1, "a": {"d": [], "c": {}}, "B": "", "_": "x", "~": "y"},
        {"é": "x", "z": "\u2028\ud7ff\U0001f600"},  # non-ASCII keys and text: rfc8785's own ordering
        {"f": 1.0, "g": 1e21, "h": -0.0},
    ],
)
def test_runtime_data_canonical_form_edges(value: object) -> None:
    try:
        expected = rfc8785.dumps(value)
    except rfc8785.CanonicalizationError:  # 2**53: outside the integers a JSON number holds exactly
        with pytest.raises(Problem, match="canonical"):
            coco_binding.canonical(value)
        return
    assert coco_binding.canonical(value) == expected


def test_runtime_data_deeper_than_the_plain_path_and_subclasses_go_to_rfc8785() -> None:
    deep: object = "x"
    for _ in range(40):
        deep = {"k": deep}
    assert coco_binding.canonical(deep) == rfc8785.dumps(deep)
    assert coco_binding.canonical({"level": _Level.HIGH}) == rfc8785.dumps({"level": _Level.HIGH})
