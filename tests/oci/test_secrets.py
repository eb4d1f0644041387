"""[[secrets]] through cove-runtime: attested to a real broker before the program starts, as `cove run` does."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time

from tests.e2e.helpers import make_instance
from tests.e2e.test_kbs_provisioning import broker, platform_env, release_to, secrets_config  # noqa: F401
from tests.oci.helpers import RUNTIME


def test_secrets_are_provisioned_before_the_program_starts(cove, broker, platform_env, tmp_path):
    app = make_instance(cove, tmp_path, name="app", build=False, extra=secrets_config(broker.url, broker.ca))
    (app / "cove.toml").write_text(
        (app / "cove.toml").read_text().replace("passthrough = []", 'passthrough = ["GREETING", "COVE_PLATFORM_DIR"]')
    )
    cove.ok("build", cwd=app)
    release_to(broker, app)
    broker.admin.create_secret("app/db/password", "data", "app", value=b"s3cret-db")
    broker.admin.create_secret("app/api/token", "password", "app", exportable=False)
    cove.ok("package", "--oci", "-o", str(tmp_path / "layout"), cwd=app)
    index = json.loads((tmp_path / "layout" / "index.json").read_text())
    blobs = tmp_path / "layout" / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    with tarfile.open(blobs / manifest["layers"][0]["digest"][7:]) as layer:
        layer.extractall(bundle / "rootfs", filter="tar")
    spec = {
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {
            "args": ["/bin/sh", "-c", 'cat /run/secrets/db; echo " $API_TOKEN $GREETING ${COVE_PLATFORM_DIR:-unset}"'],
            "env": ["GREETING=hi", "COVE_PLATFORM_DIR=/tmp/evil"],
            "cwd": "/",
        },
        "mounts": [{"destination": "/run/secrets", "type": "bind", "source": "/etc"}],
        "linux": {"namespaces": [{"type": "pid"}]},
    }
    (bundle / "config.json").write_text(json.dumps(spec))
    root = tmp_path / "state"
    env = dict(os.environ, **platform_env)
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        created = subprocess.run(
            [RUNTIME, "--root", str(root), "create", "--bundle", str(bundle), "s"],
            stdout=out,
            stderr=err,
            env=env,
            timeout=60,
        )
    assert created.returncode == 0, (tmp_path / "err").read_text()
    assert subprocess.run([RUNTIME, "--root", str(root), "start", "s"], env=env).returncode == 0
    for _ in range(600):
        state = json.loads(
            subprocess.run([RUNTIME, "--root", str(root), "state", "s"], capture_output=True, text=True, env=env).stdout
        )
        if state["status"] == "stopped":
            break
        time.sleep(0.05)
    # the secrets, the passthrough value; the runtime's own COVE_ settings are not the bundle's to set
    words = (tmp_path / "out").read_text().split()
    assert len(words) == 4, (tmp_path / "err").read_text()
    assert words[0] == "s3cret-db" and len(words[1]) == 32 and words[2:] == ["hi", "unset"]
    assert subprocess.run([RUNTIME, "--root", str(root), "delete", "s"], env=env).returncode == 0
