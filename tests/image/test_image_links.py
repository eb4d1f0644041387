"""Links in an image never lead a process that may be root (the daemon, a supervisor, cove-runtime) to the
host: mount points are made inside the image, and `[process] user` is looked up in the image's own
/etc/passwd, a regular file of bounded size (a link to the host's /etc/shadow, a FIFO or /dev/zero reads
nothing, and never blocks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cove.errors import CoveError
from cove.image.staging import add_mount_points
from cove.runtime.launcher import MAX_PASSWD, resolve_user
from tests.conftest import raised_at_once


@pytest.fixture
def image(tmp_path: Path) -> Path:
    root = tmp_path / "image"
    (root / "etc").mkdir(parents=True)
    (root / "run").mkdir()
    return root


def test_a_mount_point_behind_an_absolute_link_is_made_inside_the_image(image, tmp_path):
    outside = tmp_path / "host-folder"
    outside.mkdir()
    (image / "x").symlink_to(outside)  # as a member's image may: /x -> a host folder
    add_mount_points(image, ["/x/made"])
    assert not (outside / "made").exists(), "a mount point was made outside the image"
    assert (image / str(outside).lstrip("/") / "made").is_dir()  # where the enclave's /x leads: inside


def test_a_mount_point_behind_a_relative_link_follows_it_within_the_image(image):
    (image / "var").mkdir()
    (image / "var" / "run").symlink_to("../run")
    add_mount_points(image, ["/var/run/app"])
    assert (image / "run" / "app").is_dir() and (image / "var" / "run").is_symlink()


def test_a_mount_point_through_a_file_is_one_line(image):
    (image / "file").write_text("")
    with pytest.raises(CoveError, match="cannot make mount point /file/x"):
        add_mount_points(image, ["/file/x"])


def test_passwd_behind_a_link_to_the_host_is_not_read(image, tmp_path):
    host = tmp_path / "shadow"
    host.write_text("alice:x:1234:1234::/:/bin/sh\n")
    (image / "etc" / "passwd").symlink_to(host)
    with pytest.raises(CoveError, match="not in the image's /etc/passwd"):
        resolve_user("alice", image)
    (image / "etc" / "passwd").unlink()
    (image / "etc" / "passwd").write_text("alice:x:1234:1234::/:/bin/sh\n")
    assert resolve_user("alice", image) == (1234, 1234)


@pytest.mark.parametrize("kind", ["fifo", "too large"])
def test_a_passwd_that_is_no_plain_small_file_is_one_line_at_once(image, kind):
    passwd = image / "etc" / "passwd"
    if kind == "fifo":
        os.mkfifo(passwd)  # nobody writes: a read would wait for ever
        expected = "not a regular file"
    else:
        passwd.write_bytes(b"#" * (MAX_PASSWD + 1))
        expected = "larger than"
    raised = raised_at_once(lambda: resolve_user("alice", image))
    assert isinstance(raised, CoveError) and expected in str(raised), raised
