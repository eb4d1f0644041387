"""Random read/write/truncate/flush/reopen sequences against a bytearray model."""

from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cove.fs import ProtectedFile

# offsets reach past the first non-root MHT node (3072 + 96 * 4096 bytes)
OFFSET = st.integers(0, 450_000)
KEY = os.urandom(16)


class ModelFile(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "m.pf")
        self.cache = 8 * 4096  # tiny: forces evictions and mid-transaction write-backs
        self.f = ProtectedFile.open(self.path, KEY, "m", "w", cache_bytes=self.cache)
        self.model = bytearray()

    def teardown(self):
        self.f.close()
        self.dir.cleanup()

    @rule(offset=OFFSET, data=st.binary(max_size=10_000))
    def write(self, offset, data):
        self.f.write(offset, data)
        if data:
            if offset > len(self.model):
                self.model.extend(bytes(offset - len(self.model)))
            self.model[offset : offset + len(data)] = data

    @rule(offset=OFFSET, n=st.integers(1, 30_000), byte=st.integers(0, 255))
    def write_run(self, offset, n, byte):
        self.write(offset, bytes([byte]) * n)

    @rule(size=OFFSET)
    def truncate(self, size):
        self.f.truncate(size)
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))

    @rule(offset=OFFSET, n=st.integers(0, 20_000))
    def read(self, offset, n):
        assert self.f.read(offset, n) == bytes(self.model[offset : offset + n])

    @rule()
    def flush(self):
        self.f.flush()

    @rule(mode=st.sampled_from(["r+", "r"]))
    def reopen(self, mode):
        self.f.close()
        self.f = ProtectedFile.open(self.path, KEY, "m", mode, cache_bytes=self.cache)
        assert self.f.read(0, len(self.model) + 1) == bytes(self.model)
        if mode == "r":
            self.f.close()
            self.f = ProtectedFile.open(self.path, KEY, "m", "r+", cache_bytes=self.cache)

    @precondition(lambda self: len(self.model) > 0)
    @rule(data=st.data())
    def read_tail(self, data):
        start = data.draw(st.integers(0, len(self.model) - 1))
        assert self.f.read(start, len(self.model)) == bytes(self.model[start:])

    @invariant()
    def size_matches(self):
        assert self.f.size() == len(self.model)


ModelFile.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestModelFile = ModelFile.TestCase
