"""A member's instance that names host paths is refused by the daemon, which would open them as root.

The daemon's supervisors run enclaves as root, so a host mount's source, an
encrypted mount's absolute source, a `file:` key or the broker's CA file in a
member's cove.toml would be opened with root's rights: a member could bind
the node's image store writable, or read root's files. The daemon refuses
such an instance (403, HostPaths) before anything is registered, and `cove
run` then runs it directly, as the member, with the member's own rights.
Root's own instances keep their host mounts through the daemon.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess

import pytest

from cove import config as config_mod
from tests.conftest import ROOT, require
from tests.daemon.conftest import make_hello_instance

MEMBER = 4243
HOST_MOUNT = '\n[[mounts]]\ntarget = "/data"\ntype = "host"\nsource = "{source}"\nwritable = true\n'
NAMED = {
    "host mount": ('[[mounts]]\ntarget = "/d"\ntype = "host"\nsource = "/srv/d"\n', "mounts[0].source /srv/d"),
    "encrypted, absolute source": (
        '[[mounts]]\ntarget = "/d"\ntype = "encrypted"\nsource = "/srv/v"\nkey = "seal:mrenclave"\n',
        "mounts[0].source /srv/v",
    ),
    "encrypted, key file": (
        '[[mounts]]\ntarget = "/d"\ntype = "encrypted"\nkey = "file:/etc/cove/k"\n',
        "mounts[0].key file:/etc/cove/k",
    ),
    "broker CA": ('[attestation]\nkbs = "https://kbs.example"\nca = "/etc/ca.pem"\n', "attestation.ca /etc/ca.pem"),
}
NOT_HOST = (
    '[[mounts]]\ntarget = "/t"\ntype = "tmpfs"\n'
    '[[mounts]]\ntarget = "/v"\ntype = "encrypted"\nsource = "vol"\nkey = "seal:mrsigner"\n'
)


@pytest.mark.parametrize("case", sorted(NAMED))
def test_host_paths_names_each_host_path(case):
    text, expected = NAMED[case]
    assert config_mod.host_paths(config_mod.parse('[enclave]\nname = "x"\n' + text)) == [expected]


def test_host_paths_leaves_what_stays_in_the_enclave_or_the_node():
    assert config_mod.host_paths(config_mod.parse('[enclave]\nname = "x"\n' + NOT_HOST)) == []


def test_cove_runtime_leaves_the_nodes_broker_ca_out():
    """cove-runtime allows the node's broker CA that cluster images name (checked a regular file, parsed)."""
    text, _ = NAMED["broker CA"]
    config = config_mod.parse('[enclave]\nname = "x"\n' + text)
    assert config_mod.host_paths(config, ca_file=False) == [] and len(config_mod.host_paths(config)) == 1


ASK = """
import json, sys
from cove.daemon.client import Client, DaemonError
client = Client()
try:
    client.call("POST", "/enclaves", {"instance": sys.argv[1], "program": "/bin/hello", "args": []})
    out = {"created": True}
except DaemonError as exc:
    out = {"status": exc.status, "kind": exc.kind, "code": exc.exit_code, "line": exc.line}
out["listed"] = [e["id"] for e in client.call("GET", "/enclaves?all=true")]
print(json.dumps(out))
"""


def test_a_members_instance_naming_a_root_only_folder_is_refused(node, cove, hello, test_group, tmp_path):
    """The review's case: a member binds a folder only root may write (here a 0700 root folder) writable."""
    secret = tmp_path / "roots"
    secret.mkdir(mode=0o700)
    (secret / "file").write_text("root's\n")
    parent = tmp_path / "member"
    parent.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(parent, 0o755)
    instance = make_hello_instance(cove, parent, hello)
    with open(instance / "cove.toml", "a") as handle:
        handle.write(HOST_MOUNT.format(source=secret))
    cove.ok("build", cwd=instance)
    for folder, dirs, files in os.walk(instance):
        for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            os.lchown(name, MEMBER, MEMBER)
    setpriv = require("setpriv")
    done = subprocess.run(
        [setpriv, f"--reuid={MEMBER}", f"--regid={MEMBER}", f"--groups={test_group}", "--", "/usr/bin/python3"]
        + ["-c", ASK, str(instance)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src"), "COVE_DAEMON_SOCKET": node.socket, "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer.get("status") == 403 and answer["kind"] == "HostPaths" and answer["code"] == 2, answer
    assert f".source {secret}" in answer["line"] and "COVE_NO_DAEMON=1" in answer["line"]
    assert answer["listed"] == [], "a refused start left an enclave"
    assert (secret / "file").read_text() == "root's\n"


def test_roots_instance_keeps_its_host_mount_through_the_daemon(node, hello, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    instance = make_hello_instance(node.cove, tmp_path, hello)
    with open(instance / "cove.toml", "a") as handle:
        handle.write(HOST_MOUNT.format(source=shared).replace("writable = true", "writable = false"))
    node.cove.ok("build", cwd=instance)
    ident = node.cove.ok("run", "-d", "/bin/hello", cwd=instance).stdout.strip()
    try:
        assert node.cove.ok("wait", ident).stdout.split() == ["0"]
    finally:
        node.cove("rm", "-f", ident)


def test_cove_run_of_a_members_instance_with_a_host_mount_runs_it_directly(node, user_cove, hello, test_group):
    """`cove run` through the daemon: refused there (nothing registered), then run as the member itself."""
    member = copy.copy(user_cove)  # the session's runner, in the test group and pointed at the node
    member.prefix = [f"--groups={test_group}" if arg == "--clear-groups" else arg for arg in user_cove.prefix]
    member.env = dict(user_cove.env, COVE_DAEMON_SOCKET=node.socket)
    parent = member.workdir / "host-paths"
    parent.mkdir()
    shared = parent / "shared"
    shared.mkdir()
    own_hello = parent / "hello"
    shutil.copy(hello, own_hello)
    for path in (parent, shared, own_hello):
        os.chown(path, member.uid, member.gid)
    member.ok("new", "app", cwd=parent)
    instance = parent / "app"
    member.ok("add", "--to", "/bin", str(own_hello), cwd=instance)
    with open(instance / "cove.toml", "a") as handle:
        handle.write(HOST_MOUNT.format(source=shared))
    member.ok("build", cwd=instance)
    images_before = {image["id"] for image in node.api("GET", "/v1/images")[1]}
    done = member("run", "/bin/hello", "0", "3", cwd=instance)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "hello 3\n" and done.stderr == "to stderr\n", (done.stdout, done.stderr)
    # the daemon was asked (it imported the build), registered nothing, and the run went on directly
    assert {image["id"] for image in node.api("GET", "/v1/images")[1]} - images_before, "the daemon was not asked"
    assert [e for e in node.api("GET", "/v1/enclaves?all=true")[1] if e.get("uid") == member.uid] == []
