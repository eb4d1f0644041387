"""One enclave instance and its OCI image, built once per session and shared by the OCI tests."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from tests.e2e.helpers import make_instance
from tests.oci.helpers import IMAGE, SPEC, podman, write_spec


@pytest.fixture(scope="session")
def oci_instance(cove, tmp_path_factory) -> Path:
    """A built instance with shell tools (entry points /bin/ and /usr/bin/)."""
    return make_instance(cove, tmp_path_factory.mktemp("oci"), name="hello")


@pytest.fixture(scope="session")
def oci_tar(cove, oci_instance) -> Path:
    """The instance as a loadable OCI tarball, tagged cove-test/hello:1."""
    out = oci_instance.parent / "hello.oci.tar"
    cove.ok("package", "--oci", "--tag", "cove-test/hello:1", "-o", str(out), cwd=oci_instance)
    return out


@pytest.fixture(scope="session")
def oci_layer(oci_tar, tmp_path_factory) -> Path:
    """The image's root file system layer (an uncompressed tar)."""
    import json
    import tarfile

    folder = tmp_path_factory.mktemp("layer")
    with tarfile.open(oci_tar) as archive:
        archive.extractall(folder, filter="data")
    manifest = json.loads((folder / "manifest.json").read_text())
    return folder / manifest[0]["Layers"][0]


def retag_tampered(oci_tar: Path, out: Path, tag: str) -> Path:
    """A copy of an OCI tarball whose layer has /bin/cat changed (the signed build kept), re-digested.

    The image is well-formed for every engine; only Cove's check can notice.
    """
    import hashlib
    import io
    import json
    import tarfile

    with tarfile.open(oci_tar) as archive:
        files = {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}
    docker = json.loads(files["manifest.json"])[0]
    layer_name, config_name = docker["Layers"][0], docker["Config"]
    source = io.BytesIO(files[layer_name])
    changed = io.BytesIO()
    with tarfile.open(fileobj=source) as old, tarfile.open(fileobj=changed, mode="w", format=tarfile.PAX_FORMAT) as new:
        for member in old.getmembers():
            data = old.extractfile(member).read() if member.isfile() else None
            if member.name == "bin/cat":
                data = b"#!/bin/sh\necho tampered\n"
                member.size = len(data)
            new.addfile(member, io.BytesIO(data) if data is not None else None)
    layer = changed.getvalue()
    layer_digest = hashlib.sha256(layer).hexdigest()
    config = json.loads(files[config_name])
    config["rootfs"]["diff_ids"] = [f"sha256:{layer_digest}"]
    config_bytes = json.dumps(config).encode()
    config_digest = hashlib.sha256(config_bytes).hexdigest()
    index = json.loads(files["index.json"])
    manifest = json.loads(files["blobs/sha256/" + index["manifests"][0]["digest"][7:]])
    manifest["config"].update(digest=f"sha256:{config_digest}", size=len(config_bytes))
    manifest["layers"][0].update(digest=f"sha256:{layer_digest}", size=len(layer))
    manifest_bytes = json.dumps(manifest).encode()
    manifest_digest = hashlib.sha256(manifest_bytes).hexdigest()
    index["manifests"][0].update(
        digest=f"sha256:{manifest_digest}",
        size=len(manifest_bytes),
        annotations={"io.containerd.image.name": tag, "org.opencontainers.image.ref.name": tag.rpartition(":")[2]},
    )
    blobs = {
        f"blobs/sha256/{layer_digest}": layer,
        f"blobs/sha256/{config_digest}": config_bytes,
        f"blobs/sha256/{manifest_digest}": manifest_bytes,
        "index.json": json.dumps(index).encode(),
        "oci-layout": files["oci-layout"],
        "manifest.json": json.dumps(
            [{"Config": f"blobs/sha256/{config_digest}", "RepoTags": [tag], "Layers": [f"blobs/sha256/{layer_digest}"]}]
        ).encode(),
    }
    with tarfile.open(out, "w") as archive:
        for name, data in sorted(blobs.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out


class Containerd:
    """A containerd of the tests' own: private root, state and socket; stopped at the end."""

    def __init__(self, base: Path, config: str = ""):
        import subprocess
        import time

        from tests.conftest import require

        self.base = base
        self.socket = base / "containerd.sock"
        self.ctr_bin = require("ctr")
        (base / "config.toml").write_text("version = 2\n" + config)
        self.log = open(base / "containerd.log", "w")
        self.process = subprocess.Popen(
            [
                require("containerd"),
                "--config",
                str(base / "config.toml"),
                "--root",
                str(base / "root"),
                "--state",
                str(base / "state"),
                "--address",
                str(self.socket),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        for _ in range(300):
            if self.socket.exists() and self.ctr("version").returncode == 0:
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"containerd did not start: {(base / 'containerd.log').read_text()[-2000:]}")

    def ctr(self, *args, timeout=120, **kwargs):
        import subprocess

        return subprocess.run(
            [self.ctr_bin, "-a", str(self.socket), *args], capture_output=True, text=True, timeout=timeout, **kwargs
        )

    def stop(self) -> None:
        import subprocess

        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        import os
        import signal

        for pid in filter(str.isdigit, os.listdir("/proc")):  # shims of containers a failed test left
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(self.socket).encode() in cmdline:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        with open("/proc/self/mounts") as mounts:
            points = [line.split()[1] for line in mounts]
        for point in sorted((p for p in points if p.startswith(str(self.base) + "/")), reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)


@pytest.fixture(scope="session")
def containerd(tmp_path_factory):
    daemon = Containerd(
        tmp_path_factory.mktemp("containerd"), '[plugins."io.containerd.grpc.v1.cri"]\n  disable_apparmor = true\n'
    )
    yield daemon
    daemon.stop()


@pytest.fixture
def bundle(oci_layer, tmp_path):
    """A fresh bundle: config.json and the image's layer unpacked as an engine would."""
    folder = tmp_path / "bundle"
    (folder / "rootfs").mkdir(parents=True)
    with tarfile.open(oci_layer) as layer:
        layer.extractall(folder / "rootfs", filter="tar")
    for extra in ("proc", "etc/hosts", "run/.containerenv"):  # what engines add
        path = folder / "rootfs" / extra
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch() if "." in extra or "/" in extra else path.mkdir(exist_ok=True)
    write_spec(folder, SPEC)
    return folder


@pytest.fixture(scope="session")
def loaded(oci_tar, tmp_path_factory):
    assert podman("load", "-i", str(oci_tar)).returncode == 0
    tampered = retag_tampered(oci_tar, tmp_path_factory.mktemp("tampered") / "t.tar", "localhost/cove-test/tampered:1")
    result = podman("load", "-i", str(tampered))
    assert result.returncode == 0, result.stderr
    yield
    podman("rmi", "-f", IMAGE, "localhost/cove-test/tampered:1")
