"""Every example under examples/ builds and runs in a sim enclave, as its README says."""

from __future__ import annotations

import json
import shutil
import subprocess

from tests.conftest import ROOT, require
from tests.e2e.helpers import set_option

EXAMPLES = ROOT / "examples"


def test_c_hello(cove, tmp_path):
    require("gcc")
    subprocess.run(["gcc", "-O2", "-o", str(tmp_path / "hello"), str(EXAMPLES / "c-hello" / "hello.c")], check=True)
    cove.ok("new", "hello-enclave", cwd=tmp_path)
    root = tmp_path / "hello-enclave"
    cove.ok("add", "../hello", cwd=root)
    cove.ok("build", cwd=root)
    result = cove.ok("run", "/bin/hello", "world", cwd=root)
    assert result.stdout.startswith("hello from enclave hello-enclave (pid 2) world")


def test_python(cove, tmp_path):
    require("python3.11")
    cove.ok("new", "py", cwd=tmp_path)
    root = tmp_path / "py"
    cove.ok("add", "--bom", str(EXAMPLES / "python" / "cove.bom"), cwd=root)
    cove.ok("build", cwd=root)
    result = cove.ok("run", "/usr/bin/python3.11", "/app/app.py", "hello", cwd=root)
    out = json.loads(result.stdout)
    assert out["python"].startswith("3.11")
    assert out["sqlite_sum"] == 45
    assert out["argv"] == ["hello"]
    assert out["root"] == ["app", "bin", "dev", "etc", "lib", "lib64", "proc", "root", "tmp", "usr"]
    cove.ok("add", "--sdk", cwd=root)  # the in-enclave SDK where Debian's Python finds it
    cove.ok("build", cwd=root)
    sdk = cove.ok(
        "run", "/usr/bin/python3.11", "-c", "from cove import enclave; print(enclave.attestation_type())", cwd=root
    )
    assert sdk.stdout in ("cove\n", "none\n")
    # glibc dlopens libgcc_s when a thread is unwound at exit; without it python aborts (134)
    # (20 times, each a fresh interpreter, in one enclave: it aborted one run in three)
    runs = (
        "import subprocess, sys\n"
        "for _ in range(20):\n"
        "    done = subprocess.run([sys.executable, '/app/threads.py'], capture_output=True, text=True)\n"
        "    print(done.returncode, done.stdout.strip(), done.stderr.strip())\n"
    )
    result = cove.ok("run", "/usr/bin/python3.11", "-c", runs, cwd=root)
    assert result.stdout.splitlines() == ["0 threads ok "] * 20


def test_shell(cove, tmp_path):
    cove.ok("new", "sh-app", cwd=tmp_path)
    root = tmp_path / "sh-app"
    cove.ok("add", "--bom", str(EXAMPLES / "shell" / "cove.bom"), cwd=root)
    set_option(root / "cove.toml", "process", "entry_points", '["/app/hello.sh"]')
    cove.ok("build", cwd=root)
    result = cove.ok("run", "/app/hello.sh", "a", "b", cwd=root)
    assert "args: a b" in result.stdout
    assert "files at /: app bin dev etc lib lib64 proc root tmp" in result.stdout
    assert cove("run", "/bin/sh", "-c", "true", cwd=root).returncode == 2  # not an entry point


def test_java(cove, tmp_path):
    javac, jlink = require("javac"), require("jlink")
    subprocess.run([javac, "-d", str(tmp_path / "classes"), str(EXAMPLES / "java" / "Hello.java")], check=True)
    subprocess.run(
        [
            jlink,
            "--add-modules",
            "java.base",
            "--strip-debug",
            "--no-header-files",
            "--no-man-pages",
            "--output",
            str(tmp_path / "jre"),
        ],
        check=True,
    )
    cove.ok("new", "java-app", cwd=tmp_path)
    root = tmp_path / "java-app"
    cove.ok("add", "--to", "/opt", "../jre", cwd=root)
    # the libraries java finds through $ORIGIN come with the tree, not again at their host path
    assert not list((root / "image" / "tmp").iterdir())
    cove.ok("add", "--to", "/app", "../classes/Hello.class", cwd=root)
    set_option(root / "cove.toml", "process", "entry_points", '["/opt/jre/bin/java"]')
    cove.ok("build", cwd=root)
    result = cove.ok("run", "/opt/jre/bin/java", "-cp", "/app", "Hello", "x", cwd=root)
    assert result.stdout.startswith("hello from java 17") and result.stdout.strip().endswith("args x")
    shutil.rmtree(tmp_path / "jre")  # the enclave needs nothing of the host's copy
    assert cove.ok("run", "/opt/jre/bin/java", "-cp", "/app", "Hello", cwd=root).stdout.startswith("hello")
