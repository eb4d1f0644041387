"""What a `vm` enclave's vTPM costs: start, provisioning, and evidence with a vTPM quote.

Starts a real swtpm as the launcher does, provisions it (EK, AK, launch PCR)
and makes evidence with a vTPM quote as /dev/attestation/quote does, against
a self-certified platform key of its own. The baseline measured in the same
run is the platform layer's generic quote (a flush before and after), which
the vTPM's quote used to be.

    .venv/bin/python bench/vm_vtpm.py [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from cove.attest import evidence as ev
from cove.platform import monitor
from cove.platform.reports import EnclaveClaims
from cove.platform.state import Paths
from cove.runtime.vm_vtpm import AK_HANDLE, Vtpm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cove-vm-vtpm-") as tmp:
        folder = Path(tmp)
        signer = monitor.signer(Paths(folder / "platform"))
        claims = EnclaveClaims(b"\x01" * 32, b"\x02" * 32, 0, 0, False, "vm", "vm (tcg, emulated)", "bench")
        starts, provisions, evidence, quotes, generic = [], [], [], [], []
        for _ in range(args.runs):
            began = time.perf_counter()
            vtpm = Vtpm.start(folder)
            started = time.perf_counter()
            vtpm.provision(os.urandom(32))
            provisioned = time.perf_counter()
            starts.append(started - began)
            provisions.append(provisioned - started)
            quoter = vtpm.quoter(signer)
            began = time.perf_counter()
            signer.evidence(claims, os.urandom(ev.REPORT_DATA_SIZE), quoter)
            evidence.append(time.perf_counter() - began)
            began = time.perf_counter()
            vtpm.quote(os.urandom(32))
            quotes.append(time.perf_counter() - began)
            began = time.perf_counter()
            vtpm.tpm.quote(AK_HANDLE, [ev.LAUNCH_PCR], os.urandom(32))
            generic.append(time.perf_counter() - began)
            vtpm.stop()

        def ms(values: list[float]) -> float:
            return statistics.median(values) * 1000

        print(
            f"swtpm start {ms(starts):.0f} ms; provisioning (EK, AK, launch PCR) {ms(provisions):.0f} ms; "
            f"evidence with a vTPM quote {ms(evidence):.0f} ms (median of {args.runs})"
        )
        print(
            f"vTPM quote {ms(quotes):.0f} ms against {ms(generic):.0f} ms for the generic quote with two flushes "
            f"(x{ms(quotes) / ms(generic):.2f}); load average {os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    main()
