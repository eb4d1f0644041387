"""`cove-runtime` driven directly, as an engine drives runc: the lifecycle, and every bad bundle."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from tests.oci.helpers import RUNTIME, SPEC, no_leftovers, one_line, runtime, state, wait_stopped, write_spec


def test_lifecycle_create_start_state_delete(bundle, tmp_path):
    root = tmp_path / "state"
    out = open(tmp_path / "out", "w+")
    created = runtime(
        root,
        "create",
        "--bundle",
        str(bundle),
        "--pid-file",
        str(tmp_path / "pid"),
        "c1",
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    assert created.returncode == 0, (tmp_path / "out").read_text()
    # a `start` right after `create` finds the container waiting: the fifo has its reader before create returns
    os.close(os.open(root / "c1" / "start.fifo", os.O_WRONLY | os.O_NONBLOCK))
    pid = int((tmp_path / "pid").read_text())
    seen = state(root, "c1")
    assert seen["status"] == "created" and seen["pid"] == pid and seen["ociVersion"].startswith("1.")
    assert seen["bundle"] == str(bundle)
    again = runtime(root, "create", "--bundle", str(bundle), "c1")
    assert again.returncode == 2 and "already exists" in one_line(again)
    assert runtime(root, "start", "c1").returncode == 0
    wait_stopped(root, "c1", pid)
    assert (tmp_path / "out").read_text().split() == ["hello-from-enclave", "cove"]
    assert state(root, "c1")["pid"] == 0
    assert runtime(root, "delete", "c1").returncode == 0
    no_leftovers(root, "c1")


def test_kill_and_delete_rules(bundle, tmp_path):
    root = tmp_path / "state"
    spec = json.loads(json.dumps(SPEC))
    spec["process"]["args"] = ["/bin/sh", "-c", "trap 'exit 9' TERM; while :; do sleep 0.1; done"]
    write_spec(bundle, spec)
    assert runtime(root, "create", "--bundle", str(bundle), "c2", stdout=subprocess.DEVNULL).returncode == 0
    assert runtime(root, "start", "c2").returncode == 0
    assert state(root, "c2")["status"] == "running"
    refused = runtime(root, "delete", "c2")
    assert refused.returncode == 2 and "running" in one_line(refused)
    assert state(root, "c2")["status"] == "running"  # no effect on the container
    unknown = runtime(root, "kill", "nope", "TERM")
    assert unknown.returncode == 8 and "does not exist" in one_line(unknown)
    bad = runtime(root, "kill", "c2", "SIGNOPE")
    assert bad.returncode == 2 and "not a signal" in one_line(bad)
    pid = launcher(root, "c2")
    for _ in range(200):
        groups = cove_cgroups(pid)
        if groups:
            break
        time.sleep(0.05)
    assert groups, "the enclave's cgroups were not made"
    assert runtime(root, "kill", "c2", "KILL").returncode == 0  # a crash, as far as the runtime knows
    wait_stopped(root, "c2", 0)
    gone = runtime(root, "kill", "c2", "KILL")
    assert gone.returncode == 2 and "not running" in one_line(gone)
    assert runtime(root, "kill", "--all", "c2", "9").returncode == 0  # as runc: what containerd's shim sends
    assert runtime(root, "delete", "c2").returncode == 0
    assert not cove_cgroups(pid)
    no_leftovers(root, "c2")
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _is_enclave_of(p, root)]


def launcher(root, ident):
    """The container's own process (the launcher, which names the cgroups cove-PID-*): behind the stub the engine
    sees when create went through the resident helper (cove.oci.resident)."""
    import marshal

    record = marshal.loads((root / ident / "state.marshal").read_bytes())
    return record.get("enclave_pid") or record["pid"]


def cove_cgroups(pid):
    """The cgroups cove.runtime.limits made for a launcher with this pid, anywhere in the hierarchy."""
    return [
        path
        for hierarchy in ("memory", "pids", "unified")
        for path in Path("/sys/fs/cgroup", hierarchy).glob(f"**/cove-{pid}-*")
    ]


def _is_enclave_of(pid, root):
    try:
        return str(root) in open(f"/proc/{pid}/cmdline").read()
    except OSError:
        return False


def test_delete_force_of_a_running_container(bundle, tmp_path):
    root = tmp_path / "state"
    spec = json.loads(json.dumps(SPEC))
    spec["process"]["args"] = ["/bin/sleep", "60"]
    write_spec(bundle, spec)
    assert runtime(root, "create", "--bundle", str(bundle), "c3").returncode == 0
    assert runtime(root, "start", "c3").returncode == 0
    assert runtime(root, "delete", "--force", "c3").returncode == 0
    no_leftovers(root, "c3")


def _change(spec, path, value):
    spec = json.loads(json.dumps(spec))
    target = spec
    for key in path[:-1]:
        target = target[key]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return spec


BAD_SPECS = [
    (("ociVersion",), "2.0.0", 2, "ociVersion"),
    (("process", "capabilities", "bounding"), ["CAP_SYS_ADMIN"], 2, "CAP_SYS_ADMIN"),
    (("linux", "namespaces"), [{"type": "mount"}], 2, "PID namespace"),
    (("linux", "devices"), [{"path": "/dev/kvm", "type": "c", "major": 10, "minor": 232}], 2, "linux.devices"),
    (("mounts",), [{"destination": "/dev/attestation", "type": "bind", "source": "/tmp"}], 2, "/dev/attestation"),
    (("mounts",), [{"destination": "/data", "type": "bind", "source": "/etc"}], 2, "mounts[0]"),
    (("annotations",), {"io.podman.annotations.privileged": "TRUE"}, 2, "privileged"),
    (("process", "user"), {"uid": 1000, "gid": 1000}, 2, "process.user"),
    (("process", "cwd"), "/tmp", 2, "process.cwd"),
    (("process", "args"), ["nothing-here"], 2, "process.args[0]"),
    (("process", "args"), ["../bin/echo"], 2, "relative path"),
    (("process",), None, 2, "process is missing"),
    (("root", "path"), "../..", 2, "out of the bundle"),
]


@pytest.mark.parametrize("path, value, code, word", BAD_SPECS, ids=[w for *_, w in BAD_SPECS])
def test_bad_bundles_are_refused_with_one_line(bundle, tmp_path, path, value, code, word):
    root = tmp_path / "state"
    write_spec(bundle, _change(SPEC, path, value))
    result = runtime(root, "create", "--bundle", str(bundle), "bad")
    assert result.returncode == code and word in one_line(result)
    no_leftovers(root, "bad")


def test_malformed_and_missing_config(bundle, tmp_path):
    root = tmp_path / "state"
    (bundle / "config.json").write_text("{not json")
    result = runtime(root, "create", "--bundle", str(bundle), "m")
    assert result.returncode == 2 and "not valid JSON" in one_line(result)
    (bundle / "config.json").unlink()
    result = runtime(root, "create", "--bundle", str(bundle), "m")
    assert result.returncode == 8 and "no config.json" in one_line(result)
    no_leftovers(root, "m")


def test_symlink_escape_in_root_path(bundle, tmp_path):
    root = tmp_path / "state"
    outside = tmp_path / "outside"
    shutil.move(bundle / "rootfs", outside)
    os.symlink(outside, bundle / "rootfs")
    result = runtime(root, "create", "--bundle", str(bundle), "s")
    assert result.returncode == 2 and "out of the bundle" in one_line(result)


@pytest.mark.parametrize("tamper", ["content", "symlink", "unsigned", "manifest"])
def test_tampered_rootfs_is_refused_before_anything_runs(bundle, tmp_path, tamper):
    root = tmp_path / "state"
    rootfs = bundle / "rootfs"
    if tamper == "content":
        (rootfs / "bin" / "cat").write_bytes(b"#!/bin/sh\necho evil\n")
    elif tamper == "symlink":
        (rootfs / "bin" / "cat").unlink()
        os.symlink("/etc/shadow", rootfs / "bin" / "cat")
    elif tamper == "unsigned":
        shutil.rmtree(rootfs / ".cove")
    else:
        data = bytearray((rootfs / ".cove" / "manifest.cbor").read_bytes())
        data[-1] ^= 1
        (rootfs / ".cove" / "manifest.cbor").write_bytes(bytes(data))
    result = runtime(root, "create", "--bundle", str(bundle), "--pid-file", str(tmp_path / "pid"), "t")
    assert result.returncode == 3, result.stderr
    one_line(result)
    assert not (tmp_path / "pid").exists()
    no_leftovers(root, "t")


def test_features_and_version(tmp_path):
    features = json.loads(runtime(tmp_path, "features").stdout)
    assert features["ociVersionMin"] == "1.0.0" and "cove.dev/unmeasured-debug" in features["annotations"]
    assert runtime(tmp_path, "--version").stdout.startswith("cove-runtime version")
    result = runtime(tmp_path, "frobnicate")
    assert result.returncode == 2
    one_line(result)


@pytest.mark.parametrize("tamper", ["unsigned", "content"])
def test_unmeasured_debug_annotation_runs_and_every_report_says_debug(bundle, tmp_path, tamper):
    import cbor2

    from cove.attest.evidence import parse_report

    root = tmp_path / "state"
    rootfs = bundle / "rootfs"
    if tamper == "unsigned":
        shutil.rmtree(rootfs / ".cove")
    else:
        (rootfs / "bin" / "cat").write_bytes((rootfs / "bin" / "cat").read_bytes() + b"\0")
    spec = json.loads(json.dumps(SPEC))
    spec["annotations"] = {"cove.dev/unmeasured-debug": "true"}
    spec["process"]["args"] = ["/bin/cat", "/dev/attestation/report"]
    write_spec(bundle, spec)
    out = open(tmp_path / "out", "wb")
    err = open(tmp_path / "err", "w")
    assert runtime(root, "create", "--bundle", str(bundle), "u", stdout=out, stderr=err).returncode == 0
    assert "UNMEASURED DEBUG" in (tmp_path / "err").read_text()
    assert state(root, "u")["annotations"]["cove.dev/unmeasured"] == "true"
    assert runtime(root, "start", "u").returncode == 0
    wait_stopped(root, "u", 0)
    report = parse_report(cbor2.loads((tmp_path / "out").read_bytes())["report"])
    assert report.debug is True
    assert runtime(root, "delete", "u").returncode == 0
    no_leftovers(root, "u")


def test_cluster_memory_annotation_only_lowers_the_measured_limit(bundle, tmp_path):
    root = tmp_path / "state"
    spec = json.loads(json.dumps(SPEC))
    spec["process"]["args"] = ["/bin/sleep", "30"]
    spec["annotations"] = {"cove.dev/enclave-memory-mib": "100", "cove.dev/kbs-url": "https://kbs.example:8080"}
    write_spec(bundle, spec)  # the hello image has no [attestation]: the broker annotation does not concern it
    assert runtime(root, "create", "--bundle", str(bundle), "mem").returncode == 0
    pid = launcher(root, "mem")
    assert runtime(root, "start", "mem").returncode == 0
    limits = []
    for _ in range(200):
        limits = [
            int((g / "memory.limit_in_bytes").read_text())
            for g in cove_cgroups(pid)
            if (g / "memory.limit_in_bytes").exists()
        ]
        if limits:
            break
        time.sleep(0.05)
    assert limits == [100 << 20]
    assert runtime(root, "delete", "--force", "mem").returncode == 0
    spec["annotations"] = {"cove.dev/enclave-memory-mib": "lots"}
    write_spec(bundle, spec)
    result = runtime(root, "create", "--bundle", str(bundle), "mem2")
    assert result.returncode == 2 and "enclave-memory-mib" in one_line(result)
    no_leftovers(root, "mem2")


MEASURED_REFUSALS = {
    # a cluster's broker annotation must name the measured broker
    "another broker": (
        '\n[attestation]\nkbs = "https://kbs.measured.example:8080"\n',
        {"cove.dev/kbs-url": "https://kbs.elsewhere.example:8080"},
        "cove.dev/kbs-url",
    ),
    # cove-runtime runs the enclave as root for whoever made the pod: it opens no host path an image names
    "a host mount": ('\n[[mounts]]\ntarget = "/host"\ntype = "host"\nsource = "/etc"\n', {}, "names host paths"),
    "a key file": (
        '\n[[mounts]]\ntarget = "/v"\ntype = "encrypted"\nkey = "file:/etc/cove/volume.key"\n',
        {},
        "mounts[1].key file:/etc/cove/volume.key",
    ),
}


@pytest.mark.parametrize("case", sorted(MEASURED_REFUSALS))
def test_what_the_measured_config_may_not_ask_of_a_container_is_refused(cove, tmp_path, case):
    from tests.e2e.helpers import make_instance

    extra, annotations, word = MEASURED_REFUSALS[case]
    app = make_instance(cove, tmp_path, name="refused", extra=extra)
    cove.ok("package", "--oci", "-o", str(tmp_path / "layout"), cwd=app)
    index = json.loads((tmp_path / "layout" / "index.json").read_text())
    manifest = json.loads((tmp_path / "layout" / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
    folder = tmp_path / "bundle"
    (folder / "rootfs").mkdir(parents=True)
    with tarfile.open(tmp_path / "layout" / "blobs" / "sha256" / manifest["layers"][0]["digest"][7:]) as layer:
        layer.extractall(folder / "rootfs", filter="tar")
    spec = json.loads(json.dumps(SPEC))
    spec["annotations"] = annotations
    write_spec(folder, spec)
    result = runtime(tmp_path / "state", "create", "--bundle", str(folder), "k")
    assert result.returncode == 2 and word in one_line(result), result
    no_leftovers(tmp_path / "state", "k")


def test_an_encrypted_root_runs_from_the_ciphertext_in_the_image(cove, tmp_path):
    from tests.e2e.helpers import make_instance

    app = make_instance(cove, tmp_path, name="sealed", build=False)
    (app / "image" / "etc" / "secret.conf").write_text("plain-only-inside\n")
    platform = {"COVE_PLATFORM_DIR": os.environ["COVE_PLATFORM_DIR"]} if "COVE_PLATFORM_DIR" in os.environ else {}
    cove.ok("build", "--encrypt-image", "seal:mrsigner", cwd=app, env=platform)  # the runtime's platform too
    cove.ok("package", "--oci", "-o", str(tmp_path / "layout"), cwd=app)
    index = json.loads((tmp_path / "layout" / "index.json").read_text())
    blobs = tmp_path / "layout" / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    folder = tmp_path / "bundle"
    (folder / "rootfs").mkdir(parents=True)
    with tarfile.open(blobs / manifest["layers"][0]["digest"][7:]) as layer:
        layer.extractall(folder / "rootfs", filter="tar")
    spec = json.loads(json.dumps(SPEC))
    spec["process"]["args"] = ["/bin/cat", "/etc/secret.conf"]
    write_spec(folder, spec)
    root = tmp_path / "state"
    out = open(tmp_path / "out", "w")
    err = open(tmp_path / "err", "w")
    assert runtime(root, "create", "--bundle", str(folder), "e", stdout=out, stderr=err).returncode == 0, (
        tmp_path / "err"
    ).read_text()
    assert runtime(root, "start", "e").returncode == 0
    wait_stopped(root, "e", 0)
    assert (tmp_path / "out").read_text() == "plain-only-inside\n", (tmp_path / "err").read_text()
    assert runtime(root, "delete", "e").returncode == 0
    no_leftovers(root, "e")
    # the unmeasured /.cove/ may not have root open host paths: a file: key source, image.enc as a link
    image_key, image_enc = folder / "rootfs" / ".cove" / "image.key", folder / "rootfs" / ".cove" / "image.enc"
    fifo = tmp_path / "host.key"
    os.mkfifo(fifo)  # had the runtime read it, it would wait for ever
    image_key.write_text(f"file:{fifo}\n")
    result = runtime(root, "create", "--bundle", str(folder), "h", timeout=20)
    assert result.returncode == 2 and "opens no host path" in one_line(result), result.stderr
    no_leftovers(root, "h")
    image_key.write_text("seal:mrsigner\n")
    shutil.move(image_enc, tmp_path / "elsewhere.enc")
    os.symlink(tmp_path / "elsewhere.enc", image_enc)
    result = runtime(root, "create", "--bundle", str(folder), "l", timeout=20)
    assert result.returncode == 3 and "image.enc in the image is not a folder" in one_line(result), result.stderr
    no_leftovers(root, "l")


def test_an_unwritable_pid_file_leaves_no_waiting_process(bundle, tmp_path):
    root = tmp_path / "state"
    result = runtime(root, "create", "--bundle", str(bundle), "--pid-file", str(tmp_path / "no" / "pid"), "p")
    assert result.returncode == 8 and "pid" in one_line(result)
    no_leftovers(root, "p")
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _is_enclave_of(p, root)]
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _waits_in(p, root)]


def _waits_in(pid, root):
    """A process whose command line names this test's state folder (the container process does: --root)."""
    try:
        return str(root) in open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
    except OSError:
        return False


HOT_IMPORTS = """
import sys
from cove.oci import cli
code = cli.main(sys.argv[1:])
cove = sorted(m for m in sys.modules if m.split('.')[0] == 'cove')
other = sorted(m for m in sys.modules if m.split('.')[0] not in sys.stdlib_module_names and m.split('.')[0] != 'cove'
               and not m.startswith(('__editable__', '_distutils_hack', '__main__')))
heavy = sorted(m for m in ('json', 're', 'enum', 'signal', 'typing', 'pathlib') if m in sys.modules)
print(code, ' '.join(cove), '|', ' '.join(other), '|', ' '.join(heavy), file=sys.stderr)
"""
LIGHT = ["cove", "cove.oci", "cove.oci.cli"]


def _hot(root, *argv):
    """(exit code, cove's modules, other non-standard modules, the slow standard ones) after one hot command."""
    import sys

    result = subprocess.run(
        [sys.executable, "-c", HOT_IMPORTS, "--root", str(root), *argv], capture_output=True, text=True, timeout=60
    )
    *_, last = result.stderr.splitlines()
    code, rest = last.split(" ", 1)
    cove, other, heavy = rest.split("|")
    return int(code), cove.split(), other.split(), heavy.split()


@pytest.mark.parametrize(
    "argv",
    [
        ["state", "nope"],
        ["start", "nope"],
        ["kill", "nope", "KILL"],
        ["delete", "--force", "nope"],
        ["--log-format=json", "features"],
    ],
    ids=["state", "start", "kill", "delete", "features"],
)
def test_hot_commands_load_only_the_standard_library(tmp_path, argv):
    """Engines call these many times per container: a Python start and the standard library, nothing of Cove's
    verification or launcher (which cost the engine 100+ ms per call); cove.errors only on a path that fails."""
    code, cove, other, _ = _hot(tmp_path, *argv)
    assert code == (8 if argv[0] in ("state", "start", "kill") else 0)
    assert cove == (LIGHT if code == 0 else ["cove", "cove.errors", "cove.oci", "cove.oci.cli"]), cove
    assert other == [], other


# Avoidable on the launch path (docs/performance.md, "What the launch path loads"): pyelftools (the launch check
# reads PT_INTERP itself), cryptography's serialization (pulls in ssh, RSA, DSA, EC, ciphers: create needs only
# Ed25519's raw bytes), the secure file system (only for an encrypted mount), and nothing of the CLI's or the
# node service's heavy libraries.
LAUNCH_AVOIDS = (
    "elftools",
    "cryptography.hazmat.primitives.serialization",
    "cryptography.hazmat.primitives.ciphers",
    "cove.fs",
    "click",
    "pydantic",
    "trio",
    "pyfuse3",
    "prometheus_client",
    "tarfile",  # only for running a packaged instance
)
MODULES = """
import sys
print(' '.join(sorted(sys.modules)), file=open(sys.argv[1], 'w'))
"""


def _avoidable(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == name or m.startswith(name + ".") for name in LAUNCH_AVOIDS)]


def test_create_loads_nothing_avoidable(bundle, tmp_path, monkeypatch):
    """`create` loads the verifier (config, manifest, signature) and the standard library, and nothing more: what
    it loads, its container's process inherits (about 35 ms of CPU per container, docs/performance.md). This is
    the in-process path; through the resident helper the client loads none of it (test_resident.py)."""
    import sys

    monkeypatch.setenv("COVE_RUNTIME_RESIDENT", "0")

    root, seen = tmp_path / "state", tmp_path / "modules"
    script = HOT_IMPORTS.split("cove = sorted")[0] + MODULES.replace("sys.argv[1]", repr(str(seen)))
    with open(tmp_path / "err", "w") as err:
        done = subprocess.run(
            [sys.executable, "-c", script, "--root", str(root), "create", "--bundle", str(bundle), "m"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            timeout=60,
        )
    assert done.returncode == 0, (tmp_path / "err").read_text()
    try:
        modules = seen.read_text().split()
        assert "cove.image.signing" in modules and "cove.config" in modules  # it did verify
        assert _avoidable(modules) == [], _avoidable(modules)
        assert "cove.runtime.launcher" not in modules  # the container's process loads it, not the engine's call
        assert [m for m in ("shutil", "tempfile", "random") if m in modules] == []  # only the launcher needs them
    finally:
        assert runtime(root, "delete", "--force", "m").returncode == 0
    no_leftovers(root, "m")


def test_the_container_process_loads_nothing_avoidable(bundle, tmp_path):
    """What the container's process adds while it waits for `start` (cove.oci.launch.warm), and the launch's
    check that a dynamic program's loader is in the image, load none of the avoidable modules."""
    import sys

    seen = tmp_path / "modules"
    script = (
        "import sys\nfrom pathlib import Path\nfrom cove.oci import launch\nfrom cove.image import elf\n"
        "launch.warm()\n"
        f"elf.check_startable(Path({str(bundle / 'rootfs')!r}), '/bin/sh')\n"
        f"print(' '.join(sorted(sys.modules)), file=open({str(seen)!r}, 'w'))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    modules = seen.read_text().split()
    assert "cove.runtime.launcher" in modules and "cove.runtime.sim" in modules
    assert _avoidable(modules) == [], _avoidable(modules)


def test_a_direct_cove_run_loads_nothing_avoidable(cove, oci_instance, tmp_path):
    """`cove run` without the node service (issue 13's direct start) launches through the same launcher: none
    of the avoidable modules either, and it still checks the program's loader (a dynamic /bin/echo runs)."""
    import sys

    seen = tmp_path / "modules"
    script = (
        "import atexit, sys\n"
        f"atexit.register(lambda: print(' '.join(sorted(sys.modules)), file=open({str(seen)!r}, 'w')))\n"
        "from cove.cli import run_main\n"
        "sys.argv = ['cove', 'run', '/bin/echo', 'direct']\n"
        "run_main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=oci_instance,
        env=dict(cove.env, COVE_NO_DAEMON="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout) == (0, "direct\n"), done.stderr
    modules = seen.read_text().split()
    assert "cove.runtime.launcher" in modules and "cove.image.signing" in modules
    assert _avoidable(modules) == [], _avoidable(modules)


def test_kill_and_delete_load_no_slow_standard_module(tmp_path):
    """`kill` and `delete` of a live container (what engines send after every exit) run on Python's built-in
    modules: json, re, enum, signal, typing, pathlib (~5 ms of a ~15 ms call) load on no successful path."""
    from cove.oci import cli

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        container = cli.Container(str(tmp_path), "c")
        os.mkdir(container.dir, 0o700)
        found = cli.start_time(sleeper.pid)
        assert found is not None
        container.save({"id": "c", "pid": sleeper.pid, "pid_start": found[0], "bundle": "/b", "cgroups": []})
        assert _hot(tmp_path, "kill", "c", "SIGTERM") == (0, LIGHT, [], [])
        assert sleeper.wait(timeout=10) == -15
        assert _hot(tmp_path, "delete", "c") == (0, LIGHT, [], [])
        assert not os.path.exists(container.dir)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_container_an_earlier_runtime_created_is_still_stopped_and_deleted(tmp_path):
    """Before the state moved to marshal it was state.json: a container running across an upgrade stays reachable."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        from cove.oci import cli

        (tmp_path / "old").mkdir()
        found = cli.start_time(sleeper.pid)
        assert found is not None
        legacy = {"id": "old", "pid": sleeper.pid, "pid_start": found[0], "bundle": "/b", "annotations": {}}
        (tmp_path / "old" / "state.json").write_text(json.dumps(dict(legacy, cgroups=[])))
        assert state(tmp_path, "old")["status"] == "created"
        assert runtime(tmp_path, "kill", "old", "KILL").returncode == 0
        assert sleeper.wait(timeout=10) == -9
        assert state(tmp_path, "old")["status"] == "stopped"
        assert runtime(tmp_path, "delete", "old").returncode == 0
        assert not (tmp_path / "old").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_delete_moves_the_folder_away_and_removes_it_detached(tmp_path):
    """`delete` renames the folder (no container id starts with a dot) and leaves its removal to an `rm` that holds
    none of the caller's pipes: right after an enclave's exit each rmdir in its private root waits out the kernel's
    release of the sandbox's mounts. What a killed removal left goes with the next delete."""
    from cove.oci import cli

    for ident in ("a", "b"):
        container = cli.Container(str(tmp_path), ident)
        os.makedirs(os.path.join(container.dir, "root", "deep", "er"))
        Path(container.dir, "root", "deep", "file").write_text("x")
        container.save({"id": ident, "pid": 0, "bundle": "/b", "cgroups": []})
    (tmp_path / ".gone-old-1" / "x").mkdir(parents=True)
    result = subprocess.run(
        [RUNTIME, "--root", str(tmp_path), "delete", "a"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and result.stdout == result.stderr == ""
    assert not (tmp_path / "a").exists() and (tmp_path / "b").exists()
    for _ in range(200):
        if sorted(os.listdir(tmp_path)) == ["b"]:
            break
        time.sleep(0.05)
    assert sorted(os.listdir(tmp_path)) == ["b"]
    assert state(tmp_path, "b")["status"] == "stopped"


def test_a_damaged_state_is_one_line_and_delete_force_removes_it(tmp_path):
    root = tmp_path / "state"
    (root / "c").mkdir(parents=True)
    (root / "c" / "state.marshal").write_bytes(b"\xffnot marshal")
    for argv in (["state", "c"], ["kill", "c"], ["delete", "c"]):
        result = runtime(root, *argv)
        assert result.returncode == 2 and "state is damaged" in one_line(result), argv
    assert runtime(root, "delete", "--force", "c").returncode == 0
    assert not (root / "c").exists()


@pytest.fixture
def running(bundle, tmp_path):
    """A started container whose program keeps its own attestation report in the enclave's /tmp."""
    root = tmp_path / "state"
    spec = json.loads(json.dumps(SPEC))
    spec["process"]["args"] = ["/bin/sh", "-c", "cat /dev/attestation/report > /tmp/main.report; exec sleep 60"]
    write_spec(bundle, spec)
    assert runtime(root, "create", "--bundle", str(bundle), "x").returncode == 0
    assert runtime(root, "start", "x").returncode == 0
    from cove.runtime.procfs import enclave_program

    for _ in range(400):
        program = enclave_program(launcher(root, "x"))
        if (
            program
            and os.path.exists(f"/proc/{program}/root/tmp/main.report")
            and os.path.getsize(f"/proc/{program}/root/tmp/main.report")
        ):
            break
        time.sleep(0.05)
    yield root, program
    runtime(root, "delete", "--force", "x")
    no_leftovers(root, "x")


def _process_json(tmp_path, argv, **changes):
    process = dict(json.loads(json.dumps(SPEC))["process"], args=argv)
    process.update(changes)
    (tmp_path / "process.json").write_text(json.dumps(process))
    return str(tmp_path / "process.json")


def test_exec_runs_in_the_containers_enclave(running, bundle, tmp_path):
    """Same namespaces, same enclave identity (its report's measurement and instance), no capability,
    no_new_privs, the enclave's seccomp filter, the enclave's cgroups; the exit code comes back."""
    import hashlib

    import cbor2

    from cove.attest.evidence import parse_report

    root, program = running
    script = "cat /dev/attestation/report > /tmp/exec.report; ls -l /proc/self/ns; cat /proc/self/status; exit 6"
    result = runtime(root, "exec", "--process", _process_json(tmp_path, ["/bin/sh", "-c", script]), "x")
    assert result.returncode == 6, result.stderr
    for name in ("pid", "mnt", "user", "net", "ipc", "uts", "cgroup"):
        assert f"{name} -> {os.readlink(f'/proc/{program}/ns/{name}')}" in result.stdout
    status = dict(line.split(":\t", 1) for line in result.stdout.splitlines() if ":\t" in line)
    assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == "0000000000000000"
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    reports = [
        parse_report(cbor2.loads(Path(f"/proc/{program}/root/tmp/{n}.report").read_bytes())["report"])
        for n in ("main", "exec")
    ]
    assert reports[0].instance_id == reports[1].instance_id
    manifest = (bundle / "rootfs" / ".cove" / "manifest.cbor").read_bytes()
    assert reports[0].measurement == reports[1].measurement == hashlib.sha256(manifest).digest()
    # detached, as engines run it: the pid file names the process holding cove exec's helper, which outlives
    # this command; the program is in the enclave's cgroups
    pid_file = tmp_path / "exec.pid"
    result = runtime(
        root,
        "exec",
        "--detach",
        "--pid-file",
        str(pid_file),
        "--process",
        _process_json(tmp_path, ["/bin/sleep", "30"]),
        "x",
    )
    assert result.returncode == 0, result.stderr
    holder = int(pid_file.read_text())
    children = []
    for _ in range(300):
        helpers = _children(holder)
        children = _children(int(helpers[0])) if helpers else []
        if children:
            break
        time.sleep(0.02)
    assert children, "the exec'd program did not start"
    cgroups = [line for line in Path(f"/proc/{children[0]}/cgroup").read_text().splitlines() if "memory" in line]
    assert cgroups and cgroups == [
        line for line in Path(f"/proc/{program}/cgroup").read_text().splitlines() if "memory" in line
    ]
    os.kill(holder, 15)  # the engine's stop: the program's session ends
    for _ in range(200):
        if not Path(f"/proc/{children[0]}").exists() or _state_letter(int(children[0])) == "Z":
            break
        time.sleep(0.02)
    assert not Path(f"/proc/{children[0]}").exists() or _state_letter(int(children[0])) == "Z"


def _children(pid):
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


def _state_letter(pid):
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "X"
    return data[data.rindex(")") + 2]


def test_a_terminal_exec_lets_go_of_the_engines_pipes_when_it_returns(running, tmp_path):
    """containerd's shim reads `exec`'s stdout and stderr to the end before it takes the terminal from the
    console socket: they must close when `exec --detach` returns, not when the program ends (a short
    program's output was gone by the time the shim read the terminal: `kubectl exec -t`)."""
    import socket

    from tests.oci.helpers import RUNTIME

    root, _ = running
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(tmp_path / "console.sock"))
        server.listen(1)
        process = _process_json(tmp_path, ["/bin/sh", "-c", "echo hello-tty; exec sleep 30"], terminal=True)
        command = subprocess.Popen(
            [
                RUNTIME,
                "--root",
                str(root),
                "exec",
                "--detach",
                "--console-socket",
                str(tmp_path / "console.sock"),
                "--pid-file",
                str(tmp_path / "exec.pid"),
                "--process",
                process,
                "x",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            said, _ = command.communicate(timeout=20)  # as the shim does: to the end of both streams
        except subprocess.TimeoutExpired:
            command.kill()
            raise AssertionError("exec's stdout stayed open while its program ran") from None
        assert command.returncode == 0, said
        holder = int((tmp_path / "exec.pid").read_text())
        assert _state_letter(holder) not in "ZX", "the program should still run"
        connection, _ = server.accept()
        with connection:
            _, fds, _, _ = socket.recv_fds(connection, 64, 1)
        master = fds[0]
        try:
            seen = b""
            while b"hello-tty" not in seen:
                seen += os.read(master, 64)
        finally:
            os.close(master)
    os.kill(holder, 15)


EXEC_REFUSALS = [
    ("malformed", "{not json", 2, "not valid JSON"),
    ("deeply nested", '{"args": ' + "[" * 100_000 + "]" * 100_000 + "}", 2, "not valid JSON"),
    ("trailing garbage", '{"args": ["/bin/echo", "ran"]} []', 2, "not valid JSON"),
    ("added capability", {"capabilities": {"bounding": ["CAP_SYS_ADMIN"]}}, 2, "CAP_SYS_ADMIN"),
    ("other user", {"user": {"uid": 1000, "gid": 1000}}, 2, "measured user"),
    ("other cwd", {"cwd": "/tmp"}, 2, "measured cwd"),
    ("not an entry point", {"args": ["/hello-not-here"]}, 2, "not an entry point"),
    ("relative args[0]", {"args": ["../bin/echo", "ran"]}, 2, "relative path"),  # was /bin/../bin/echo
    ("no args", {"args": []}, 2, "args must be a non-empty list"),
    ("terminal without a socket", {"terminal": True}, 2, "console-socket"),
]


def test_exec_refusals(running, tmp_path):
    root, _ = running
    for label, change, code, word in EXEC_REFUSALS:
        path = _process_json(tmp_path, ["/bin/echo", "ran"], **(change if isinstance(change, dict) else {}))
        if isinstance(change, str):
            Path(path).write_text(change)
        result = runtime(root, "exec", "--process", path, "x")
        assert result.returncode == code and word in one_line(result), (label, result.stderr)
        assert "ran" not in result.stdout
    (tmp_path / "big.json").write_text(" " * (2 << 20))
    big = runtime(root, "exec", "--process", str(tmp_path / "big.json"), "x")
    assert big.returncode == 2 and "larger than" in one_line(big)
    unknown = runtime(root, "exec", "--process", _process_json(tmp_path, ["/bin/echo"]), "nope")
    assert unknown.returncode == 8 and "does not exist" in one_line(unknown)
    assert runtime(root, "kill", "x", "KILL").returncode == 0
    wait_stopped(root, "x", 0)
    stopped = runtime(root, "exec", "--process", _process_json(tmp_path, ["/bin/echo", "ran"]), "x")
    assert stopped.returncode == 2 and "is stopped" in one_line(stopped) and "ran" not in stopped.stdout


def test_hostile_exec_settings_are_refused_in_one_line(running, tmp_path):
    """exec.json in the container's state, tampered: one line naming the settings, never a crash or a
    reinterpretation (a list or deep nesting used to end in a TypeError or RecursionError line, a text uid
    in a wrong-user refusal)."""
    root, _ = running
    settings = Path(root) / "x" / "exec.json"
    good = settings.read_bytes()
    wrong_type = json.loads(good)
    wrong_type["uid"] = str(wrong_type["uid"])
    hostile = {
        "deep-nesting": b"[" * 100_000,
        "trailing-garbage": good + b" {}",
        "wrong-top-level-type": b"[" + good + b"]",
        "wrong-field-type": json.dumps(wrong_type).encode(),
    }
    process = _process_json(tmp_path, ["/bin/echo", "ran"])
    for label, data in hostile.items():
        settings.write_bytes(data)
        result = runtime(root, "exec", "--process", process, "x")
        assert result.returncode != 0 and "no exec settings" in one_line(result), (label, result.stderr)
        assert "ran" not in result.stdout
    settings.write_bytes(good)
    assert "ran" in runtime(root, "exec", "--process", process, "x").stdout
