"""TCG PC Client event logs (crypto-agile format): parse, replay, check a quote against them.

A quote proves PCR values; the event log says what was measured into them.
Replaying the log (each digest extended from zero, in order, per bank) must
give exactly the quoted values, or the log is not the one the TPM saw. The
first event is the SHA-1 format "Spec ID Event03" header listing the banks
and digest sizes; EV_NO_ACTION events are not extended, except that a
StartupLocality event sets PCR 0's starting value.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from cove.attest._reader import Reader
from cove.attest.errors import VerificationError
from cove.attest.tpm_structs import HASH_ALGS, HASH_SIZES

EV_NO_ACTION = 0x00000003
SPEC_ID = b"Spec ID Event03\x00"
STARTUP_LOCALITY = b"StartupLocality\x00"
MAX_EVENTS = 100_000


@dataclass(frozen=True)
class Event:
    pcr: int
    type: int
    digests: dict[str, bytes]
    data: bytes


@dataclass(frozen=True)
class EventLog:
    banks: dict[str, int]  # hash name -> digest size, from the header
    events: tuple[Event, ...]
    startup_locality: int = 0


def parse_event_log(data: bytes) -> EventLog:
    """Parse a crypto-agile (TCG2) binary event log."""
    r = Reader(data, "tpm", big_endian=False)
    pcr, etype = r.u32("event log header PCR"), r.u32("event log header type")
    r.take(20, "event log header digest")
    header = Reader(r.sized(4, "event log header data"), "tpm", big_endian=False)
    if pcr != 0 or etype != EV_NO_ACTION or header.take(16, "Spec ID signature") != SPEC_ID:
        raise VerificationError("tpm: event log does not start with a crypto-agile Spec ID event")
    header.u32("platform class")
    header.take(4, "spec version")
    count = header.u32("algorithm count")
    if not 1 <= count <= 8:
        raise VerificationError(f"tpm: event log lists {count} hash algorithms")
    banks: dict[int, tuple[str | None, int]] = {}
    for _ in range(count):
        alg, size = header.u16("algorithm id"), header.u16("digest size")
        name = HASH_ALGS.get(alg)
        if name is not None and HASH_SIZES[name] != size:
            raise VerificationError(f"tpm: event log says {name} digests are {size} bytes")
        banks[alg] = (name, size)
    header.take(header.u8("vendor info size"), "vendor info")
    header.end("Spec ID event")
    events: list[Event] = []
    locality = 0
    while r.remaining():
        if len(events) >= MAX_EVENTS:
            raise VerificationError("tpm: event log has too many events")
        pcr, etype = r.u32("event PCR"), r.u32("event type")
        if pcr > 23:
            raise VerificationError(f"tpm: event log names PCR {pcr}")
        n = r.u32("event digest count")
        if n > len(banks):
            raise VerificationError(f"tpm: event has {n} digests for {len(banks)} banks")
        digests: dict[str, bytes] = {}
        for _ in range(n):
            alg = r.u16("event digest algorithm")
            if alg not in banks:
                raise VerificationError(f"tpm: event digest of algorithm 0x{alg:04x} not in the log header")
            name, size = banks[alg]
            digest = r.take(size, "event digest")
            if name is not None:
                digests[name] = digest
        body = r.sized(4, "event data")
        if etype == EV_NO_ACTION and pcr == 0 and body.startswith(STARTUP_LOCALITY) and len(body) == 17:
            locality = body[16]
        events.append(Event(pcr, etype, digests, body))
    return EventLog({n: s for n, s in banks.values() if n is not None}, tuple(events), locality)


def replay(log: EventLog) -> dict[str, dict[int, bytes]]:
    """The PCR values the log produces, per bank."""
    out: dict[str, dict[int, bytes]] = {bank: {} for bank in log.banks}
    for event in log.events:
        if event.type == EV_NO_ACTION:
            continue
        for bank, digest in event.digests.items():
            size = HASH_SIZES[bank]
            start = bytes(size - 1) + bytes([log.startup_locality]) if event.pcr == 0 else bytes(size)
            current = out[bank].get(event.pcr, start)
            out[bank][event.pcr] = hashlib.new(bank, current + digest).digest()
    return out


def event_log_check(data: bytes) -> Callable[[dict[str, dict[int, bytes]]], None]:
    """A check for verify_tpm_quote: every quoted PCR the log covers must replay to its value."""
    replayed = replay(parse_event_log(data))

    def check(quoted: dict[str, dict[int, bytes]]) -> None:
        for bank, values in quoted.items():
            for pcr, value in sorted(values.items()):
                want = replayed.get(bank, {}).get(pcr)
                if want is not None and not hmac.compare_digest(want, value):
                    raise VerificationError(
                        f"tpm: event log replay gives PCR {bank}:{pcr} = {want.hex()}, the quote says {value.hex()}",
                        "the log is not the one the TPM measured",
                    )

    return check
