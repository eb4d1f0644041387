"""The vm guest's memory, in one real boot: the program finds its whole limit available when it
starts, in a VM of the measured size booted with the measured command line.

Before the guest's kernel settings and PCI ports (docs/performance.md) a 512 MB enclave's
program found about 505 MB available in its 660 MB guest. The figures themselves come from
bench/vm_boot.py --memory; this holds the promise they rest on.
"""

from __future__ import annotations

import re
from pathlib import Path

import cbor2
import pytest

from cove import config as cove_config
from cove.image import vmimage
from tests.conftest import require
from tests.e2e.helpers import make_instance


@pytest.fixture(scope="module")
def instance(cove, tmp_path_factory) -> Path:
    require("qemu-system-x86_64")
    return make_instance(cove, tmp_path_factory.mktemp("vm-memory"), options={("enclave", "backend"): '"vm"'})


def test_the_program_finds_its_memory_limit_available(cove, instance: Path) -> None:
    out = cove.ok("run", "/bin/cat", "/proc/meminfo", "/proc/cmdline", cwd=instance).stdout
    meminfo = {key: int(value) << 10 for key, value in re.findall(r"^(\w+):\s+(\d+) kB$", out, re.MULTILINE)}
    limit = cove_config.parse((instance / "cove.toml").read_text()).resources.memory
    launch = cbor2.loads((instance / "build" / vmimage.FOLDER / vmimage.LAUNCH).read_bytes())
    assert meminfo["MemAvailable"] >= limit, (meminfo["MemAvailable"] >> 20, limit >> 20)
    assert meminfo["MemTotal"] <= launch["memory"]  # the VM has the measured size, no more
    assert out.rstrip("\n").splitlines()[-1] == launch["cmdline"]  # and the kernel the measured command line
