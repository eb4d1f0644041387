"""The vm backend: real QEMU micro-VMs booting the Debian kernel into Cove's init.

One instance is built once (shell tools, the C example, the isolation probe)
and booted a few times; under TCG on a busy two-core machine each boot takes
seconds, so every test that boots asks several things of one boot.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from datetime import datetime, timezone

import cbor2
import pytest

from cove.attest import evidence as ev
from cove.attest.cove_evidence_verify import verify_cove_evidence

from cove import config as cove_config
from cove.image import manifest as manifest_mod
from cove.image import vmimage
from cove.platform import sealing
from cove.runtime import vm
from tests.conftest import ROOT, Cove, error_line, require
from tests.e2e.helpers import make_instance, set_option
from tests.daemon.conftest import Node, shut_down, test_group  # noqa: F401
from tests.e2e.test_kbs_provisioning import broker, platform_env, release_to, secrets_config  # noqa: F401

SCRIPT = (
    "echo out $$; id -u; ls /; echo data > /scratch/f && cat /scratch/f; touch /x 2>/dev/null || echo read-only; "
    "echo err >&2; sleep 600 >/dev/null 2>&1 & exit 7"
)  # a child left behind ends with the enclave
SCRATCH = '\n[[mounts]]\ntarget = "/scratch"\ntype = "tmpfs"\noptions = { size = "8M", mode = "1777" }\n'


@pytest.fixture(scope="module")
def hello(tmp_path_factory) -> Path:
    require("gcc")
    out = tmp_path_factory.mktemp("hello") / "hello"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(ROOT / "examples" / "c-hello" / "hello.c")], check=True)
    return out


CONNECT = r"""
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {  /* connect ADDRESS PORT: print what the peer sends first */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &a.sin_addr);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0) { printf("denied %s\n", strerror(errno)); return 1; }
    char buf[64] = {0};
    printf("connected %s\n", read(fd, buf, sizeof buf - 1) > 0 ? buf : "");
    return 0;
}
"""


@pytest.fixture(scope="module")
def connect(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("connect")
    (folder / "connect.c").write_text(CONNECT)
    subprocess.run(["gcc", "-O2", "-o", str(folder / "connect"), str(folder / "connect.c")], check=True)
    return folder / "connect"


NEWPGRP = r"""
#include <unistd.h>
int main(int argc, char **argv) {  /* newpgrp PROGRAM ARGS: run it in a process group of its own */
    if (argc < 2 || setpgid(0, 0) != 0) return 125;
    execv(argv[1], argv + 1);
    return 127;
}
"""


@pytest.fixture(scope="module")
def newpgrp(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("newpgrp")
    (folder / "newpgrp.c").write_text(NEWPGRP)
    subprocess.run(["gcc", "-O2", "-o", str(folder / "newpgrp"), str(folder / "newpgrp.c")], check=True)
    return folder / "newpgrp"


@pytest.fixture(scope="module")
def attest_probe(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("attest") / "attest_probe"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(ROOT / "tests" / "e2e" / "attest_probe.c")], check=True)
    return out


@pytest.fixture(scope="module")
def pair(cove, tmp_path_factory, probe, hello, attest_probe, connect, newpgrp) -> tuple[Path, Path]:
    """The same image and configuration built for sim and for vm."""
    require("qemu-system-x86_64")
    built = []
    for backend in ("sim", "vm"):
        parent = tmp_path_factory.mktemp(backend)
        root = make_instance(
            cove,
            parent,
            probe,
            name="hello-enclave",
            options={("enclave", "backend"): f'"{backend}"', ("process", "user"): '"1000:1000"'},
            extra=SCRATCH,
            build=False,
        )
        cove.ok("add", "--to", "/bin", str(hello), str(attest_probe), str(connect), str(newpgrp), cwd=root)
        cove.ok("build", cwd=root)
        built.append(root)
    return built[0], built[1]


@pytest.fixture(scope="module")
def vm_instance(pair) -> Path:
    return pair[1]


def test_c_and_shell_same_as_sim(cove, pair):
    sim, vm = pair
    runs = []
    for argv in (("/bin/hello", "world"), ("/bin/sh", "-c", SCRIPT)):
        on_sim = cove("run", *argv, cwd=sim)
        on_vm = cove("run", *argv, cwd=vm)
        assert (on_vm.returncode, on_vm.stdout) == (on_sim.returncode, on_sim.stdout), (on_vm.stderr, on_sim.stderr)
        runs.append(on_vm)
    assert (runs[0].returncode, runs[0].stdout) == (0, "hello from enclave hello-enclave (pid 2) world\n")
    assert runs[1].returncode == 7 and runs[1].stderr == "err\n"
    assert runs[1].stdout.startswith("out 2\n1000\n") and runs[1].stdout.endswith(
        "scratch\ntmp\nusr\ndata\nread-only\n"
    )
    assert cove("run", "/bin/cat", cwd=vm, input="through stdin\n").stdout == "through stdin\n"


def test_python_example_same_as_sim(cove, tmp_path):
    require("python3.11")
    outputs = []
    for backend in ("sim", "vm"):
        cove.ok("new", backend, cwd=tmp_path)
        root = tmp_path / backend
        cove.ok("add", "--bom", str(ROOT / "examples" / "python" / "cove.bom"), cwd=root)
        set_option(root / "cove.toml", "enclave", "backend", f'"{backend}"')
        cove.ok("build", cwd=root)
        result = cove("run", "/usr/bin/python3.11", "/app/app.py", "hello", cwd=root)
        outputs.append((result.returncode, result.stdout))
    assert outputs[0] == outputs[1] and outputs[1][0] == 0
    assert '"sqlite_sum": 45' in outputs[1][1]


def test_launch_measurement_in_manifest(cove, pair, tmp_path):
    sim, vm = pair
    assert manifest_mod.decode((sim / "build" / "manifest.cbor").read_bytes()).launch is None
    signed = manifest_mod.decode((vm / "build" / "manifest.cbor").read_bytes())
    assert signed.launch["type"] == "vm" and len(signed.launch["measurement"]) == 32
    # sim's measured configuration has no trace of the vm backend (its manifests keep their bytes)
    config = cove_config.parse('[enclave]\nname = "x"\nbackend = "sim"\n[vm]\nvcpus = 2\n')
    assert "vm" not in cove_config.to_measured(config)
    # reproducible: building again from the same inputs gives the same initramfs and measurement
    before = (vm / "build" / "vm" / "initrd.cpio").read_bytes()
    os.utime(vm / "image" / "bin" / "sh")
    cove.ok("build", cwd=vm)
    assert (vm / "build" / "vm" / "initrd.cpio").read_bytes() == before
    assert manifest_mod.decode((vm / "build" / "manifest.cbor").read_bytes()).encoded == signed.encoded


def _flip(path: Path, offset: int) -> bytes:
    data = bytearray(path.read_bytes())
    original = bytes(data)
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))
    return original


def _cmdline_flipped(path: Path) -> bytes:
    original = path.read_bytes()
    description = cbor2.loads(original)
    description["cmdline"] = description["cmdline"].replace("panic=-1", "panic=-2")
    path.write_bytes(cbor2.dumps(description, canonical=True))
    return original


@pytest.mark.parametrize("what", ["kernel", "initrd", "cmdline"])
def test_tampered_launch_inputs_refused_before_boot(cove, vm_instance, what):
    folder = vm_instance / "build" / "vm"
    path = folder / {"kernel": "vmlinuz", "initrd": "initrd.cpio", "cmdline": "launch.cbor"}[what]
    original = _cmdline_flipped(path) if what == "cmdline" else _flip(path, 4096 + 17)
    runtime = vm_instance.parent / f"runtime-{what}"
    runtime.mkdir()
    try:
        result = cove("run", "/bin/hello", cwd=vm_instance, env={"COVE_VM_TIMINGS": str(runtime / "timings")})
        assert result.returncode != 0 and result.stdout == ""
        line = error_line(result)
        assert ("kernel" if what == "kernel" else "initrd" if what == "initrd" else "launch description") in line
        assert not (runtime / "timings").exists()  # no guest was started
    finally:
        path.write_bytes(original)


class _Listener:
    """A TCP service on the host's loopback that greets whoever connects."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen()
        self.port = self.socket.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                peer, _ = self.socket.accept()
            except OSError:
                return
            peer.sendall(b"hello-from-host")
            peer.close()

    def close(self):
        self.socket.close()


def test_network_none_cannot_reach_host(cove, vm_instance):
    listener = _Listener()
    try:
        result = cove(
            "run",
            "/bin/sh",
            "-c",
            f"/bin/probe connect {listener.port}; "
            f"/bin/connect 10.0.2.2 {listener.port}; cat /proc/net/dev; cat /proc/modules",
            cwd=vm_instance,
        )
    finally:
        listener.close()
    assert "connect: denied" in result.stdout and "denied Network is unreachable" in result.stdout, result.stderr
    interfaces = [
        line.split(":")[0].strip()
        for line in result.stdout.splitlines()
        if ":" in line and not line.startswith(("connect", "Inter", " face"))
    ]
    assert interfaces == ["lo"]
    modules = [line.split()[0] for line in result.stdout.splitlines() if " Live " in line]
    assert "virtio_console" in modules and "virtio_net" not in modules  # no network driver in the guest at all


def test_network_host_reaches_the_host_through_qemu_user_network(cove, vm_instance):
    config = vm_instance / "cove.toml"
    original = config.read_text()
    listener = _Listener()
    try:
        config.write_text(original.replace('mode = "none"', 'mode = "host"', 1))
        cove.ok("build", cwd=vm_instance)
        result = cove("run", "/bin/connect", "10.0.2.2", str(listener.port), cwd=vm_instance)
        assert (result.returncode, result.stdout) == (0, "connected hello-from-host\n"), result.stderr
    finally:
        listener.close()
        config.write_text(original)
        cove.ok("build", cwd=vm_instance)


def _qemu_children(pid: int, name: bytes = b"qemu-system") -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and name in cmd:
                found.append(int(entry))
    return found


def _wait_for(what, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_the_callers_umask_is_the_programs_as_on_sim(cove, vm_instance):
    result = subprocess.run(
        cove.popen_args("run", "/bin/sh", "-c", "umask; echo x > /tmp/f; ls -l /tmp/f"),
        cwd=vm_instance,
        env=cove.env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.umask(0o027),
    )
    assert result.returncode == 0 and result.stdout.startswith("0027\n-rw-r----- "), result.stdout + result.stderr


def test_a_signal_during_the_boot_is_held_until_the_program_runs(cove, vm_instance):
    """SIGTERM while the guest boots: neither dropped (the program would run to its end) nor sent ahead
    of the launch request (the guest init would read it as the request's length and fail)."""
    run = subprocess.Popen(
        cove.popen_args("run", "/bin/sh", "-c", "sleep 20; echo finished"),
        cwd=vm_instance,
        env=dict(cove.env, COVE_VM_ACCEL="tcg"),  # no KVM probe boot: the first QEMU is the enclave's
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: _qemu_children(run.pid), timeout=60)  # QEMU runs: the launcher relays signals
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert (run.returncode, out) == (128 + signal.SIGTERM, ""), err


def test_signal_relayed_and_kill_9_leaves_nothing(cove, vm_instance, tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    env = dict(cove.env, COVE_RUNTIME_DIR=str(runtime))
    script = "trap 'echo got TERM; exit 42' TERM; echo ready; while :; do sleep 1; done"
    run = subprocess.Popen(
        cove.popen_args("run", "/bin/sh", "-c", script),
        cwd=vm_instance,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert run.stdout.readline() == "ready\n", run.communicate(timeout=30)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=30)
    assert (run.returncode, out) == (42, "got TERM\n"), err

    run = subprocess.Popen(
        cove.popen_args("run", "/bin/sh", "-c", "echo ready; sleep 600"),
        cwd=vm_instance,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert run.stdout.readline() == "ready\n"
    qemu = _wait_for(lambda: _qemu_children(run.pid))
    assert len(_qemu_children(run.pid, b"swtpm")) == 1  # one vTPM per VM
    os.kill(qemu[0], signal.SIGKILL)
    out, err = run.communicate(timeout=30)
    assert run.returncode != 0
    assert len([line for line in err.splitlines() if line.strip()]) == 1 and "Traceback" not in err
    assert "without the program's exit code" in err
    assert os.listdir(runtime) == []  # no private folder, vTPM state, socket or copied kernel left behind
    assert not _qemu_children(run.pid) and not _qemu_children(run.pid, b"swtpm")

    # kill -9 of `cove run` itself takes its QEMU along
    run = subprocess.Popen(
        cove.popen_args("run", "/bin/sh", "-c", "echo ready; sleep 600"),
        cwd=vm_instance,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert run.stdout.readline() == "ready\n"
    qemu = _wait_for(lambda: _qemu_children(run.pid))[0]
    swtpm = _qemu_children(run.pid, b"swtpm")[0]
    run.kill()
    run.communicate(timeout=30)
    for pid in (qemu, swtpm):  # both die with the launcher (PR_SET_PDEATHSIG)
        _wait_for(
            lambda pid=pid: not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text(),
            timeout=10,
        )


def test_guest_that_never_boots_times_out(cove, vm_instance):
    config = vm_instance / "cove.toml"
    original = config.read_text()
    try:
        # no init to run and a kernel that waits forever after its panic
        config.write_text(original + '\n[vm]\nkernel_args = "rdinit=/missing panic=0"\nboot_timeout = 5\n')
        cove.ok("build", cwd=vm_instance)
        result = cove("run", "/bin/hello", cwd=vm_instance)
        assert result.returncode != 0 and result.stdout == ""
        assert "did not start the program within 5 s" in error_line(result)
    finally:
        config.write_text(original)
        cove.ok("build", cwd=vm_instance)


def test_what_vm_lacks_is_refused_before_boot(cove, pair):
    """A build made for sim has no launch measurement (host mounts on vm: tests/e2e/test_vm_mounts.py)."""
    sim_instance, _ = pair
    sim_build = cove("run", "--backend", "vm", "/bin/hello", cwd=sim_instance)
    assert sim_build.returncode != 0 and "no vm launch measurement" in error_line(sim_build)


def test_vm_config_is_checked(cove, vm_instance):
    config = vm_instance / "cove.toml"
    original = config.read_text()
    try:
        for bad, key in (
            ("vcpus = 0", "vm.vcpus"),
            ('kernel = "relative"', "vm.kernel"),
            ('kernel_args = "a\\u0001b"', "vm.kernel_args"),
            ("memory = 1", "vm"),
        ):
            config.write_text(original + f"\n[vm]\n{bad}\n")
            result = cove("build", cwd=vm_instance)
            assert result.returncode != 0 and key in error_line(result)
    finally:
        config.write_text(original)


def _identity(cove: Cove, root: Path) -> SimpleNamespace:
    """A build's identity as `cove inspect` reads it (what a sealing key derives from)."""
    described = json.loads(cove.ok("inspect", "--json", cwd=root).stdout)
    return SimpleNamespace(
        measurement=bytes.fromhex(described["measurement"]),
        signer=bytes.fromhex(described["signer"]),
        product_id=described["product_id"],
        svn=described["svn"],
        debug=described["debug"],
    )


def test_evidence_from_the_guest_verifies_and_a_sim_only_policy_refuses_it(cove, vm_instance, tmp_path, monkeypatch):
    env = {"COVE_PLATFORM_DIR": str(tmp_path / "platform")}
    data = os.urandom(64)
    # a report read at the same time as the quote: both helpers share one port, taking turns
    run = cove.ok(
        "run",
        "/bin/sh",
        "-c",
        f"ls /dev/attestation; /bin/attest_probe type; "
        f"/bin/attest_probe report {data.hex()} > /scratch/report & "
        f"/bin/attest_probe quote {data.hex()}; wait; cat /scratch/report; "
        "ls -ln /dev/attestation/keys; ls -lnd /dev/attestation/keys; "
        "/bin/attest_probe key mrenclave; /bin/attest_probe key mrsigner",
        cwd=vm_instance,
        env=env,
    )
    out = run.stdout.split()
    assert out[:6] == ["attestation_type", "keys", "quote", "report", "user_report_data", "cove"]
    out = out[:1] + out[2:]
    # the sealing keys: sim's derivation for this identity and this platform's root secret, 0400, the program's
    lines = run.stdout.splitlines()
    keys = {"_sgx_mrenclave": bytes.fromhex(lines[-2]), "_sgx_mrsigner": bytes.fromhex(lines[-1])}
    listing = [line.split() for line in lines[-6:-3]]
    assert [(f[0], f[2], f[3], f[4], f[-1]) for f in listing[1:]] == [
        ("-r--------", "1000", "1000", "16", "_sgx_mrenclave"),
        ("-r--------", "1000", "1000", "16", "_sgx_mrsigner"),
    ], run.stdout
    assert lines[-3].split()[0] == "dr-xr-xr-x", run.stdout
    monkeypatch.setenv("COVE_PLATFORM_DIR", env["COVE_PLATFORM_DIR"])
    assert keys == sealing.enclave_keys(_identity(cove, vm_instance))
    assert not any(key.hex() in run.stderr for key in keys.values())
    signed_report = cbor2.loads(bytes.fromhex(out[6]))
    assert ev.parse_report(signed_report["report"]).report_data == data
    evidence = tmp_path / "evidence.hex"
    evidence.write_text(out[5])
    claims = verify_cove_evidence(bytes.fromhex(out[5]), datetime.now(timezone.utc))
    report = claims.report
    assert report.backend == "vm" and report.isolation in ("vm (kvm)", "vm (tcg, emulated)")
    assert report.isolation in cove.ok("info").stdout  # the probe's cached answer
    assert report.report_data == data
    signed = manifest_mod.decode((vm_instance / "build" / "manifest.cbor").read_bytes())
    assert report.measurement == signed.measurement
    assert keys == sealing.enclave_keys(report)
    # the vTPM quoted its launch PCR holding the signed launch measurement, for this very report
    assert claims.launch == signed.launch["measurement"] and claims.vtpm is not None
    launch = signed.launch["measurement"].hex()
    accepts = tmp_path / "vm.toml"
    accepts.write_text(
        f'[cove]\nself_certified = true\nbackends = ["vm"]\nisolation = ["{report.isolation}"]\n'
        f'launch_measurements = ["{launch}"]\n'
    )
    ok = cove("verify", evidence, "--report-data", data.hex(), "--policy", accepts)
    assert ok.returncode == 0, ok.stderr
    other = tmp_path / "other-launch.toml"
    other.write_text(f'[cove]\nself_certified = true\nlaunch_measurements = ["{"00" * 32}"]\n')
    refused = cove("verify", evidence, "--report-data", data.hex(), "--policy", other)
    assert refused.returncode == 6 and f"vm launch measurement {launch} is not one" in error_line(refused)
    sim_only = tmp_path / "sim.toml"
    sim_only.write_text('[cove]\nself_certified = true\nbackends = ["sim"]\n')
    refused = cove("verify", evidence, "--report-data", data.hex(), "--policy", sim_only)
    assert refused.returncode == 6 and "backend vm is not accepted" in error_line(refused)


def test_secrets_provisioned_before_the_guest_starts(cove, tmp_path, broker, platform_env):
    instance = make_instance(
        cove, tmp_path, options={("enclave", "backend"): '"vm"'}, extra=secrets_config(broker.url, broker.ca)
    )
    release_to(broker, instance)
    broker.admin.create_secret("app/db/password", "data", "app", value=b"correct horse")
    broker.admin.create_secret("app/api/token", "data", "app", value=b"t0ken")
    result = cove(
        "run",
        "/bin/sh",
        "-c",
        'cat /run/secrets/db; echo; echo "token=$API_TOKEN"; echo hi > /run/secrets/db 2>/dev/null || echo read-only',
        cwd=instance,
        env=platform_env,
    )
    assert (result.returncode, result.stdout) == (0, "correct horse\ntoken=t0ken\nread-only\n"), result.stderr
    releases = [r for r in broker.admin.audit(action="release") if r["outcome"] == "ok"]
    assert {r["resource"] for r in releases} == {"app/db/password@1", "app/api/token@1"}


def test_through_the_node_run_detached_ps_logs_stop(cove, vm_instance, tmp_path_factory, test_group):
    """The daemon stores the vm build (kernel, initramfs and launch description too) and runs it."""
    node = Node(Path(str(tmp_path_factory.mktemp("node"))), cove)
    node.start()
    try:
        c = node.cove
        script = "trap 'echo got TERM; exit 42' TERM; echo started; while :; do sleep 1; done"
        ident = c.ok("run", "-d", "--name", "vm1", "/bin/sh", "-c", script, cwd=vm_instance).stdout.strip()
        assert len(ident) == 64
        view = node.until("vm1", "running")
        assert view["backend"] == "vm"  # not a sim run of the vm build
        assert (
            view["measurement"]
            == manifest_mod.decode((vm_instance / "build" / "manifest.cbor").read_bytes()).measurement.hex()
        )
        assert ident[:12] in c.ok("ps").stdout
        _wait_for(lambda: c.ok("logs", "vm1").stdout == "started\n", timeout=120)
        _exec_into_running_vm(node, c)
        c.ok("stop", "vm1")
        assert node.until("vm1", "exited", timeout=60)["exit_code"] == 42
        # the shell may also say (on stderr, another port: in either order) that its sleep was "Terminated"
        logs = [line for line in c.ok("logs", "vm1").stdout.splitlines() if line != "Terminated"]
        assert logs == ["started", "got TERM"]
        assert "Exited (42)" in c.ok("ps", "-a").stdout
        stored = list((node.root / "store" / "images").glob("*/build/vm/launch.cbor"))
        assert (
            len(stored) == 1 and stored[0].read_bytes() == (vm_instance / "build" / "vm" / "launch.cbor").read_bytes()
        )
        ended = c("exec", "vm1", "/bin/true")
        assert ended.returncode == 2 and "not running" in error_line(ended)
        c.ok("rm", "vm1")
    finally:
        shut_down(node)


def _exec_into_running_vm(node: Node, c: Cove) -> None:
    """`cove exec` into the running vm enclave: through the node, then straight at the guest's own checks."""
    script = (
        "echo out $(id -u) $(pwd) $$; echo err >&2; while read -r k v; do case $k in CapEff:|NoNewPrivs:) "
        "echo $k $v;; esac; done < /proc/self/status; cat /proc/2/cmdline; echo; exit 7"
    )
    done = c("exec", "vm1", "/bin/sh", "-c", script)
    lines = done.stdout.splitlines()
    assert done.returncode == 7 and done.stderr == "err\n", (done.returncode, done.stderr)
    assert lines[0].startswith("out 1000 / ") and int(lines[0].split()[3]) > 2  # the enclave's ids, folder, pid ns
    assert lines[1:3] == ["CapEff: 0000000000000000", "NoNewPrivs: 1"]
    assert lines[3].startswith("/bin/sh\0-c\0trap")  # /proc is the enclave's: its program is pid 2
    big = c.ok("exec", "vm1", "/usr/bin/head", "-c", "300000", "/dev/zero")
    assert big.stdout == "\0" * 300000
    outside = c("exec", "vm1", "/who")
    assert outside.returncode == 2 and "not an entry point" in error_line(outside)
    # the guest init checks the entry points itself: requests straight at the launcher's socket
    path = vm.exec_socket(node.state("vm1")["supervisor_pid"])
    assert path is not None and path.stat().st_mode & 0o777 == 0o600

    def ask(request: bytes) -> list[bytes]:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(60)
            conn.connect(str(path))
            conn.sendall(request)
            return conn.makefile("rb").read().splitlines()

    for program in ("/who", "/bin/../who", "/bin/", "/bin//sh", "/who\nX0\no1:41\n"):  # no forged lines
        refused = ask(json.dumps({"argv": [program]}).encode() + b"\n")
        assert len(refused) == 1 and refused[0].startswith(b"r") and b"is not an entry point" in refused[0], refused
    for bad in (
        b"not json\n",
        b'{"argv": []}\n',
        b'{"argv": ["/bin/sh", "a\\u0000b"]}\n',
        json.dumps({"argv": ["/bin/true", "x" * (70 << 10)]}).encode() + b"\n",
    ):
        assert ask(bad) == [b"r0:malformed exec request"]
    answer = ask(json.dumps({"argv": ["/bin/sh", "-c", "printf hi; exit 300"]}).encode() + b"\n")
    assert [line.split(b":")[1] for line in answer] == [b"6869", b"44"] and answer[0][:1] == b"o", answer

    def running(*markers: str) -> bool:
        seen = c.ok("exec", "vm1", "/bin/sh", "-c", "cat /proc/[0-9]*/cmdline 2>/dev/null; exit 0").stdout.replace(
            "\0", " "
        )
        return all(marker in seen for marker in markers)

    def leave(script: str, wait_for: tuple[str, ...] = ()) -> None:
        """A client that starts SCRIPT, reads its first output and leaves."""
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(path))
            conn.sendall(json.dumps({"argv": ["/bin/sh", "-c", script]}).encode() + b"\n")
            conn.settimeout(60)
            assert conn.recv(100).startswith(b"o")
            if wait_for:
                _wait_for(lambda: running(*wait_for), timeout=60)

    # a client that leaves: the guest kills the program's whole session, a process group of its own too
    leave("/bin/newpgrp /bin/sleep 604 & echo up; exec /bin/sleep 605", ("sleep 604", "sleep 605"))
    _wait_for(lambda: not running("sleep 604") and not running("sleep 605"), timeout=60)
    # a client that stops taking output (its reading side shut, so nothing to read for the launcher)
    # while the program writes without pause: the program goes too
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(path))
        conn.sendall(json.dumps({"argv": ["/bin/sh", "-c", "while :; do echo flood606; done"]}).encode() + b"\n")
        conn.settimeout(60)
        assert conn.recv(100).startswith(b"o")
        conn.shutdown(socket.SHUT_RD)
        _wait_for(lambda: not running("flood606"), timeout=60)


def test_guest_hex_decoding_is_strict(tmp_path):
    """The guest init's hex decoder (exec requests, `W` items) takes two hex digits per byte, nothing else."""
    require("gcc")
    (tmp_path / "t.c").write_text(f'''#define main cove_init_main
#include "{vmimage.INIT_SOURCE}"
#undef main
int main(void) {{
    const char *bad[] = {{" f", "+f", "-1", "0x", "f ", "g0", "\\n0"}};
    char out[3];
    for (unsigned i = 0; i < sizeof bad / sizeof *bad; i++) if (unhex(bad[i], 1, out)) return 1 + (int)i;
    if (!unhex("00fFA9", 3, out) || out[0] || (unsigned char)out[1] != 0xff || (unsigned char)out[2] != 0xa9) return 20;
    return 0;
}}
''')
    subprocess.run(["gcc", "-O2", "-o", str(tmp_path / "t"), str(tmp_path / "t.c")], check=True)
    assert subprocess.run([str(tmp_path / "t")]).returncode == 0


def test_packaged_vm_enclave_runs_and_a_changed_kernel_in_it_is_refused(cove, vm_instance, tmp_path):
    import tarfile

    package = tmp_path / "app.cove"
    cove.ok("package", str(package), cwd=vm_instance)
    with tarfile.open(package) as archive:
        names = archive.getnames()
    assert {"build/vm/vmlinuz", "build/vm/initrd.cpio", "build/vm/launch.cbor"} <= set(names)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = cove("run", "--package", str(package), "/bin/hello", "packaged", cwd=elsewhere)
    assert (result.returncode, result.stdout) == (
        0,
        "hello from enclave hello-enclave (pid 2) world\n".replace("world", "packaged"),
    ), result.stderr
    # the same archive with one byte of the kernel changed: refused before boot, no output
    tampered = tmp_path / "tampered.cove"
    with tarfile.open(package) as source, tarfile.open(tampered, "w:gz") as out:
        for member in source.getmembers():
            data = source.extractfile(member).read() if member.isfile() else None
            if member.name == "build/vm/vmlinuz":
                data = data[:5000] + bytes([data[5000] ^ 1]) + data[5001:]
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    refused = cove("run", "--package", str(tampered), "/bin/hello", cwd=elsewhere)
    assert refused.returncode != 0 and refused.stdout == "" and "kernel" in error_line(refused)


def test_another_build_has_another_mrenclave_key_and_the_same_mrsigner_key(
    cove, vm_instance, probe, attest_probe, hello, tmp_path, monkeypatch
):
    """One boot of a build that differs only in one more file: sim's derivation gives its keys."""
    other = make_instance(
        cove,
        tmp_path,
        probe,
        name="hello-enclave",
        options={("enclave", "backend"): '"vm"', ("process", "user"): '"1000:1000"'},
        extra=SCRATCH,
        build=False,
    )
    cove.ok("add", "--to", "/bin", str(attest_probe), str(hello), cwd=other)
    cove.ok("build", cwd=other)
    env = {"COVE_PLATFORM_DIR": str(tmp_path / "platform")}
    run = cove.ok(
        "run", "/bin/sh", "-c", "/bin/attest_probe key mrenclave; /bin/attest_probe key mrsigner", cwd=other, env=env
    )
    got = dict(zip(("_sgx_mrenclave", "_sgx_mrsigner"), (bytes.fromhex(line) for line in run.stdout.split())))
    monkeypatch.setenv("COVE_PLATFORM_DIR", env["COVE_PLATFORM_DIR"])
    mine, theirs = _identity(cove, other), _identity(cove, vm_instance)
    assert mine.measurement != theirs.measurement and mine.signer == theirs.signer
    assert got == sealing.enclave_keys(mine)
    assert got["_sgx_mrenclave"] != sealing.enclave_keys(theirs)["_sgx_mrenclave"]
    assert got["_sgx_mrsigner"] == sealing.enclave_keys(theirs)["_sgx_mrsigner"]


SEALING_TEST = r"""#define _GNU_SOURCE
#include <sys/reboot.h>
#define reboot(how) 0 /* die() must not reboot the machine running the test */
#define main cove_init_main
#include "INIT"
#undef main
int main(int argc, char **argv) {  /* sealing_parse each argument, then sealing_write into DIR */
    if (argc == 3 && !strcmp(argv[2], "request")) {  /* a K item among others: the items after it still parse */
        static char body[] = "Atrue\0K0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20\0Aafter\0Y" "cove";
        static struct request r;
        parse(body, sizeof body, &r);
        return r.argc == 2 && !strcmp(r.argv[1], "after") && !strcmp(r.attestation, "cove") && sealing_given ? 0 : 40;
    }
    for (int i = 2; i < argc; i++) {
        size_t n = strlen(argv[i]);
        sealing_parse(argv[i]);
        for (size_t j = 0; j < n; j++) if (argv[i][j] != '0') return 30;  /* the request's hex is wiped */
    }
    sealing_write(argv[1], 1000, 1001);
    for (unsigned j = 0; j < sizeof sealing; j++) if (sealing[j]) return 31;  /* and the init's copy */
    return 0;
}
"""


def test_guest_sealing_keys_item_is_strict(tmp_path):
    """The init's K item: exactly 64 hex digits, once; written 0400 to the program's ids, folder 0555."""
    require("gcc")
    (tmp_path / "t.c").write_text(SEALING_TEST.replace("INIT", str(vmimage.INIT_SOURCE)))
    subprocess.run(["gcc", "-O2", "-o", str(tmp_path / "t"), str(tmp_path / "t.c")], check=True)
    key = bytes(range(1, 33))
    for n, bad in enumerate(
        [
            key.hex()[:-1],
            key.hex() + "0",
            key.hex()[:-2],
            key.hex()[:-1] + "g",
            " " + key.hex()[1:],
            "",
            "0x" + key.hex()[2:],
        ]
    ):
        out = tmp_path / f"bad{n}"
        out.mkdir()
        result = subprocess.run([str(tmp_path / "t"), str(out), bad], capture_output=True, text=True)
        assert (result.returncode, result.stderr) == (1, "cove-init: malformed sealing keys item\n"), bad
        assert not (out / "keys").exists()
    twice = subprocess.run([str(tmp_path / "t"), str(tmp_path), key.hex(), key.hex()], capture_output=True, text=True)
    assert (twice.returncode, twice.stderr) == (1, "cove-init: malformed sealing keys item\n")
    assert subprocess.run([str(tmp_path / "t"), str(tmp_path), "request"]).returncode == 0
    none = tmp_path / "none"
    none.mkdir()
    assert subprocess.run([str(tmp_path / "t"), str(none)]).returncode == 0 and not (none / "keys").exists()
    good = tmp_path / "good"
    good.mkdir()
    assert subprocess.run([str(tmp_path / "t"), str(good), key.hex().upper()]).returncode == 0
    folder = os.stat(good / "keys")
    assert (folder.st_mode & 0o7777, folder.st_uid) == (0o555, 0)
    for name, data in (("_sgx_mrenclave", key[:16]), ("_sgx_mrsigner", key[16:])):
        st = os.stat(good / "keys" / name)
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o400, 1000, 1001)
        assert (good / "keys" / name).read_bytes() == data
