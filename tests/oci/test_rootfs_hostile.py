"""cove-runtime as root meets special files in an image layer: refused at once, nothing opened or left behind."""

from __future__ import annotations

import os

import pytest

from tests.oci.helpers import no_leftovers, one_line, runtime


@pytest.mark.parametrize(
    ("where", "word"),
    [
        (".cove/cove.toml", "/.cove/cove.toml in the image is not a regular file"),  # read before any check
        ("bin/cat", "bin/cat changed type"),  # an image file the signed listing names
        ("dev-node", "bin/cat changed type"),  # a device node where the listing has a file: never opened
    ],
)
def test_a_special_file_in_the_layer_is_refused_in_one_line_without_blocking(bundle, tmp_path, where, word):
    rootfs = bundle / "rootfs"
    if where == "dev-node":
        (rootfs / "bin" / "cat").unlink()
        os.mknod(rootfs / "bin" / "cat", 0o600 | 0o020000, os.makedev(5, 0))  # /dev/tty: ENXIO if it were opened
    else:
        (rootfs / where).unlink()
        os.mkfifo(rootfs / where)  # the old code's open() waited for a writer for ever
    root = tmp_path / "state"
    result = runtime(root, "create", "--bundle", str(bundle), "--pid-file", str(tmp_path / "pid"), "f", timeout=20)
    assert result.returncode == 3 and word in one_line(result), result.stderr
    assert not (tmp_path / "pid").exists()
    no_leftovers(root, "f")


def test_an_unmeasured_debug_copy_leaves_special_files_out_unopened(bundle, tmp_path):
    """The unmeasured-debug path copies the whole layer as root: a FIFO or device there is skipped, not opened."""
    import json

    from tests.oci.helpers import SPEC, write_spec

    rootfs = bundle / "rootfs"
    (rootfs / ".cove" / "cove.toml").unlink()  # no signed build: the annotation runs it unmeasured
    os.mkfifo(rootfs / "etc" / "pipe")  # copying it blocked, or failed with SpecialFileError
    os.mknod(rootfs / "etc" / "tty0", 0o600 | 0o020000, os.makedev(5, 0))  # opening it is ENXIO (/dev/zero: no end)
    spec = json.loads(json.dumps(SPEC))
    spec["annotations"] = {"cove.dev/unmeasured-debug": "true"}
    write_spec(bundle, spec)
    root = tmp_path / "state"
    result = runtime(root, "create", "--bundle", str(bundle), "u", timeout=20)
    assert result.returncode == 0, result.stderr
    copied = root / "u" / "root"  # the private copy the enclave runs from
    assert not os.path.lexists(copied / "etc" / "pipe") and not os.path.lexists(copied / "etc" / "tty0")
    assert (copied / "bin" / "cat").read_bytes() == (rootfs / "bin" / "cat").read_bytes()
    assert runtime(root, "delete", "--force", "u").returncode == 0
    no_leftovers(root, "u")
