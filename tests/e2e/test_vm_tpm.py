"""[vm] tpm_device: the VM's own vTPM as the guest's /dev/tpm0 and /dev/tpmrm0 (real QEMU, swtpm, kernel).

One build with the device, booted twice: once for what the program sees and
what its evidence then says, once for kill -9 of QEMU. Each boot takes seconds
under TCG, so each asks several things.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import cbor2
import pytest

from cove.attest import evidence as ev
from cove.attest.cove_evidence_verify import verify_cove_evidence
from cove.errors import CoveError
from cove.image import manifest as manifest_mod
from cove.image import vmimage
from tests.conftest import ROOT, error_line, require
from tests.e2e.helpers import make_instance
from tests.e2e.test_vm import _qemu_children, _wait_for

TPM_PROBE = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
/* tpm_probe read DEVICE: PCR 4 (sha256) in hex; tpm_probe extend DEVICE: extend PCR 4 with 32 bytes 0x11;
   tpm_probe quote DEVICE: quote PCR 4 with the launcher's AK, print the response code */
static int transact(const char *device, const unsigned char *cmd, size_t len, unsigned char *out, size_t size) {
    int fd = open(device, O_RDWR);
    if (fd < 0) { perror(device); return -1; }
    int n = write(fd, cmd, len) == (ssize_t)len ? (int)read(fd, out, size) : -1;
    close(fd);
    return n;
}
int main(int argc, char **argv) {
    unsigned char out[512];
    if (argc == 3 && strcmp(argv[1], "read") == 0) {
        static const unsigned char read4[] = {0x80, 0x01, 0, 0, 0, 20, 0, 0, 0x01, 0x7e, 0, 0, 0, 1, 0, 0x0b, 3, 0x10, 0, 0};
        int n = transact(argv[2], read4, sizeof read4, out, sizeof out);
        if (n != 62) { fprintf(stderr, "read: %d bytes\n", n); return 1; }
        for (int i = 30; i < 62; i++) printf("%02x", out[i]);
        printf("\n");
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "extend") == 0) {
        unsigned char cmd[65] = {0x80, 0x02, 0, 0, 0, 65, 0, 0, 0x01, 0x82, 0, 0, 0, 4, 0, 0, 0, 9,
                                 0x40, 0, 0, 0x09, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0x0b};
        memset(cmd + 33, 0x11, 32);
        int n = transact(argv[2], cmd, sizeof cmd, out, sizeof out);
        if (n < 10) { fprintf(stderr, "extend: %d bytes\n", n); return 1; }
        printf("rc %02x%02x%02x%02x\n", out[6], out[7], out[8], out[9]);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "quote") == 0) {
        /* TPM2_Quote of PCR 4 with the launcher's AK (0x81000010), an empty password, 32 bytes 0x22 */
        unsigned char cmd[73] = {0x80, 0x02, 0, 0, 0, 73, 0, 0, 0x01, 0x58, 0x81, 0, 0, 0x10, 0, 0, 0, 9,
                                 0x40, 0, 0, 0x09, 0, 0, 0, 0, 0, 0, 0x20};
        static const unsigned char tail[] = {0, 0x10, 0, 0, 0, 1, 0, 0x0b, 3, 0x10, 0, 0};
        memset(cmd + 29, 0x22, 32);
        memcpy(cmd + 61, tail, sizeof tail);
        int n = transact(argv[2], cmd, sizeof cmd, out, sizeof out);
        if (n < 10) { fprintf(stderr, "quote: %d bytes\n", n); return 1; }
        printf("rc %02x%02x%02x%02x\n", out[6], out[7], out[8], out[9]);
        return 0;
    }
    return 2;
}
"""


@pytest.fixture(scope="module")
def tpm_instance(cove, tmp_path_factory) -> Path:
    require("qemu-system-x86_64")
    require("gcc")
    folder = tmp_path_factory.mktemp("tpm-probe")
    (folder / "tpm_probe.c").write_text(TPM_PROBE)
    subprocess.run(["gcc", "-O2", "-o", str(folder / "tpm_probe"), str(folder / "tpm_probe.c")], check=True)
    attest = folder / "attest_probe"
    subprocess.run(["gcc", "-O2", "-o", str(attest), str(ROOT / "tests" / "e2e" / "attest_probe.c")], check=True)
    root = make_instance(
        cove,
        tmp_path_factory.mktemp("tpm"),
        name="tpm-enclave",
        options={("enclave", "backend"): '"vm"', ("process", "user"): '"1000:1000"'},
        extra="\n[vm]\ntpm_device = true\n",
        build=False,
    )
    cove.ok("add", "--to", "/bin", str(folder / "tpm_probe"), str(attest), cwd=root)
    cove.ok("build", cwd=root)
    return root


def test_the_guest_has_the_vtpm_holding_the_launch_measurement(cove, tpm_instance, tmp_path):
    env = {"COVE_PLATFORM_DIR": str(tmp_path / "platform")}
    data, later = os.urandom(64), os.urandom(64)
    run = cove.ok(
        "run",
        "/bin/sh",
        "-c",
        "ls -ln /dev/tpm0 /dev/tpmrm0; /bin/tpm_probe read /dev/tpmrm0; "
        f"/bin/attest_probe quote {data.hex()}; /bin/tpm_probe extend /dev/tpm0; /bin/tpm_probe read /dev/tpm0; "
        f"/bin/attest_probe quote {later.hex()}; /bin/tpm_probe quote /dev/tpm0; /bin/tpm_probe quote /dev/tpmrm0",
        cwd=tpm_instance,
        env=env,
    )
    lines = run.stdout.splitlines()
    # both devices, the program's own (it runs as 1000:1000), as /dev/attestation/keys/ are
    assert [(f[0], f[2], f[3], f[-1]) for f in (line.split() for line in lines[:2])] == [
        ("crw-------", "1000", "1000", "/dev/tpm0"),
        ("crw-------", "1000", "1000", "/dev/tpmrm0"),
    ], run.stdout
    signed = manifest_mod.decode((tpm_instance / "build" / "manifest.cbor").read_bytes())
    launch = bytes(signed.launch["measurement"])
    # the launch PCR as the program reads it: the launch measurement the launcher extended, once
    assert lines[2] == ev.launch_pcr_value(launch).hex()
    claims = verify_cove_evidence(bytes.fromhex(lines[3]), datetime.now(timezone.utc))
    assert claims.launch == launch and claims.vtpm is not None and claims.report.report_data == data
    # the guest may extend the launch PCR (it is its own TPM): one-way, so its evidence then says so
    assert lines[4] == "rc 00000000"
    assert lines[5] == hashlib.sha256(ev.launch_pcr_value(launch) + b"\x11" * 32).hexdigest()
    with pytest.raises(CoveError, match="does not hold the certified launch measurement"):
        verify_cove_evidence(bytes.fromhex(lines[6]), datetime.now(timezone.utc))
    evidence, policy = tmp_path / "later.hex", tmp_path / "policy.toml"
    evidence.write_text(lines[6])
    policy.write_text('[cove]\nself_certified = true\nbackends = ["vm"]\n')
    refused = cove("verify", evidence, "--report-data", later.hex(), "--policy", policy)
    assert refused.returncode == 5 and "does not hold the certified launch measurement" in error_line(refused)
    # the launcher's AK is not the guest's (R3 H1): a quote with it is refused, TPM_RC_HANDLE for handle 1
    assert lines[7:] == ["rc 0000018b", "rc 0000018b"], run.stdout


def test_kill_9_of_qemu_leaves_no_swtpm(cove, tpm_instance, tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    run = subprocess.Popen(
        cove.popen_args("run", "/bin/sh", "-c", "/bin/tpm_probe read /dev/tpmrm0; sleep 600"),
        cwd=tpm_instance,
        env=dict(cove.env, COVE_RUNTIME_DIR=str(runtime)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert len(run.stdout.readline().strip()) == 64
    qemu = _wait_for(lambda: _qemu_children(run.pid))
    assert len(_qemu_children(run.pid, b"swtpm")) == 1
    os.kill(qemu[0], signal.SIGKILL)
    _, err = run.communicate(timeout=30)
    assert run.returncode != 0 and "without the program's exit code" in err and "Traceback" not in err
    assert os.listdir(runtime) == []  # no private folder, vTPM state or socket
    assert not _qemu_children(run.pid, b"swtpm")


def test_the_device_is_measured_and_a_toggled_one_is_refused(cove, tpm_instance, tmp_path):
    """The device is in the launch description (and the command line that finds it); taking it out of
    the build's description, or out of cove.toml, is refused before boot."""
    launch = tpm_instance / "build" / "vm" / "launch.cbor"
    original = launch.read_bytes()
    description = cbor2.loads(original)
    assert vmimage.TPM_DEVICE in description["devices"] and vmimage.TPM_CMDLINE in description["cmdline"]
    config = tpm_instance / "cove.toml"
    toml = config.read_text()
    try:
        description["devices"].remove(vmimage.TPM_DEVICE)
        launch.write_bytes(cbor2.dumps(description, canonical=True))
        result = cove("run", "/bin/tpm_probe", "read", "/dev/tpm0", cwd=tpm_instance)
        assert result.returncode != 0 and result.stdout == ""
        assert "launch description" in error_line(result)
        launch.write_bytes(original)
        config.write_text(toml.replace("tpm_device = true", "tpm_device = false"))
        result = cove("run", "/bin/tpm_probe", "read", "/dev/tpm0", cwd=tpm_instance)
        assert result.returncode != 0 and result.stdout == "" and error_line(result)
        config.write_text(toml.replace("tpm_device = true", 'tpm_device = "yes"'))
        result = cove("build", cwd=tpm_instance)
        assert result.returncode != 0 and "vm.tpm_device" in error_line(result)
    finally:
        launch.write_bytes(original)
        config.write_text(toml)
