"""What succeeds prints nothing of Cove's own: no library noise on stderr."""

from __future__ import annotations

from tests.e2e.helpers import make_instance
from tests.fs.securefs_enclave import platform_env

ENCRYPTED = '\n[[mounts]]\ntarget = "/data"\ntype = "encrypted"\nkey = "seal:mrsigner"\n'


def test_writes_to_an_encrypted_mount_leave_stderr_empty(cove, tmp_path):
    """libfuse printed 'fuse_release(): fuse_reply_* failed' after most such runs (the unmount beat the reply)."""
    env = platform_env(tmp_path)
    app = make_instance(cove, tmp_path, extra=ENCRYPTED)
    for index in range(8):
        run = cove("run", "/bin/sh", "-c", f"echo {index} > /data/f{index}", cwd=app, env=env)
        assert run.returncode == 0 and run.stderr == "", run.stderr
    listing = cove.ok("run", "/bin/sh", "-c", "cat /data/f*", cwd=app, env=env)
    assert listing.stdout.split() == [str(index) for index in range(8)]
