"""Verification rates for every evidence type, and the latency of /dev/attestation/quote in an enclave.

Part one: verifications per second on one core (one thread) for SGX, TDX,
SNP, TPM and Cove evidence (self-certified and TPM-rooted on a swtpm), with
warm collateral, each set against the raw rate of the signature checks it
needs, measured in the same run (interleaved, median of ``--runs``). Part
two: p50/p99 of one open+read of /dev/attestation/quote from a C program in
a sim enclave, per platform kind, median over runs. Prints figures; asserts
nothing. Run as root: ``python bench/verify.py [--runs 5] [--seconds 0.5]
[--reads 300] [--no-enclave]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from verify_hw import evidence as hw_evidence  # noqa: E402
from verify_hw import primitives as hw_primitives  # noqa: E402
from verify_hw import rate  # noqa: E402

from cove.attest._x509 import load_der_cert, load_pem_chain  # noqa: E402
from cove.attest.cove_evidence_verify import verify_cove_evidence  # noqa: E402
from cove.platform import endorse, monitor, pak  # noqa: E402
from cove.platform.reports import EnclaveClaims, ReportSigner  # noqa: E402
from cove.platform.runtime_measurement import runtime_hash  # noqa: E402
from cove.platform.state import Paths  # noqa: E402
from cove.platform.swtpm import SwTpm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLAIMS = EnclaveClaims(b"\x01" * 32, b"\x02" * 32, 1, 1, False, "sim", "namespaces+seccomp", "bench")
P256, RSA3072 = "ECDSA P-256/SHA-256", "RSA-3072 PKCS#1 v1.5"


def primitives():
    out = hw_primitives()
    data = b"x" * 600
    key = rsa.generate_private_key(65537, 3072)
    sig, pub = key.sign(data, padding.PKCS1v15(), hashes.SHA256()), key.public_key()
    out[RSA3072] = lambda: pub.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
    return out


def _signature_kind(cert) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return P256 if key.curve.name == "secp256r1" else "ECDSA P-384/SHA-384"
    return RSA3072 if key.key_size == 3072 else "RSA-2048 PKCS#1 v1.5"


def chain_checks(chain_der, roots_pem) -> Counter:
    """Signature checks of one chain verification: each link by its issuer's key, and the root's self-signature."""
    certs = [load_der_cert(c, "bench", "cert") for c in chain_der]
    root = load_pem_chain(roots_pem, "bench", "root")[0]
    if certs[-1].subject != root.subject:
        certs.append(root)
    return Counter(_signature_kind(issuer) for issuer in certs[1:] + [root])


def cove_cases(tmp: Path):
    """(name, verify callable, checks) for Cove evidence; the TPM platform is returned for stopping."""
    key = pak.generate()
    self_cert = ReportSigner(key, endorse.self_certified(pak.spki(key), runtime_hash())).evidence(CLAIMS, bytes(64))
    now = datetime.now(timezone.utc)
    cases = [("cove self-cert", lambda: verify_cove_evidence(self_cert, now), {P256: 1})]
    paths = Paths(tmp / "tpm-platform")
    try:
        monitor.init(monitor.InitOptions(tpm="swtpm"), paths)
    except Exception as exc:  # no swtpm here: report what can be measured
        print(f"(no TPM-rooted case: {exc})")
        return cases, None
    evidence = monitor.signer(paths).evidence(CLAIMS, bytes(64))
    now = datetime.now(timezone.utc)
    ek_roots = SwTpm(paths.swtpm).ek_roots_pem()
    ak_roots = (paths.local_ak_ca / "ca.pem").read_bytes()
    e = endorse.load(paths)
    checks = chain_checks(e.tpm.ek_chain, ek_roots) + chain_checks(e.tpm.ak_chain, ak_roots)
    checks[P256] += 2  # the quote (AK) and the report (platform key)
    cases.append(
        ("cove TPM", lambda: verify_cove_evidence(evidence, now, ek_roots=ek_roots, ak_roots=ak_roots), dict(checks))
    )
    return cases, paths


def verification_rates(args, tmp: Path):
    prims = primitives()
    cases, tpm_paths = cove_cases(tmp)
    cases = hw_evidence() + cases
    for _, fn, _ in cases:
        fn()  # warm: parse caches, key objects
    prim_rates = {n: [] for n in prims}
    ev_rates = {n: [] for n, _, _ in cases}
    for _ in range(args.runs):  # interleaved so drift hits both alike
        for n, fn in prims.items():
            prim_rates[n].append(rate(fn, args.seconds))
        for n, fn, _ in cases:
            ev_rates[n].append(rate(fn, args.seconds))
    med = {n: statistics.median(r) for n, r in prim_rates.items()}
    print(f"median of {args.runs} runs, {args.seconds}s each, one core\n")
    print(f"{'primitive':<26}{'verifies/s':>12}")
    for n, r in med.items():
        print(f"{n:<26}{r:>12,.0f}")
    print(f"\n{'evidence':<16}{'verifies/s':>12}{'crypto bound/s':>16}{'ratio':>8}  signature checks")
    for n, _, needs in cases:
        got = statistics.median(ev_rates[n])
        bound = 1 / sum(k / med[p] for p, k in needs.items())
        print(
            f"{n:<16}{got:>12,.0f}{bound:>16,.0f}{got / bound:>8.2f}  "
            + ", ".join(f"{k}x {p}" for p, k in needs.items())
        )
    return tpm_paths


def _cove(*args, cwd=None, env=None):
    cove = str(Path(sys.executable).parent / "cove")
    proc = subprocess.run(
        [cove, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=dict(os.environ, **(env or {})),
        timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cove {' '.join(map(str, args))}: {proc.stderr.strip()}")
    return proc.stdout


def quote_latency(args, tmp: Path, tpm_paths: Paths | None) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        print("\n(no gcc: skipping the /dev/attestation latency part)")
        return
    probe = tmp / "attest_probe"
    subprocess.run([gcc, "-O2", "-o", str(probe), str(ROOT / "tests/e2e/attest_probe.c")], check=True)
    home = {"HOME": str(tmp / "home"), "XDG_CONFIG_HOME": str(tmp / "home")}
    _cove("new", "bench", cwd=tmp, env=home)
    _cove("add", "--to", "/bin", probe, cwd=tmp / "bench", env=home)
    _cove("build", cwd=tmp / "bench", env=home)
    platforms = [("self-certified", tmp / "self-platform")]
    if tpm_paths is not None:
        platforms.append(("TPM-rooted", tpm_paths.dir))
    print(
        f"\n/dev/attestation/quote, one open+read inside a sim enclave ({args.reads} reads per run, "
        f"median of {args.runs} runs)"
    )
    print(f"{'platform':<16}{'p50 ms':>10}{'p99 ms':>10}")
    for name, directory in platforms:
        env = dict(home, COVE_PLATFORM_DIR=str(directory))
        p50s, p99s = [], []
        for _ in range(args.runs):
            out = _cove("run", "/bin/attest_probe", "bench", args.reads, "ab" * 32, cwd=tmp / "bench", env=env)
            lat = sorted(int(x) / 1000 for x in out.split())
            p50s.append(statistics.median(lat))
            p99s.append(lat[min(len(lat) - 1, int(len(lat) * 0.99))])
        print(f"{name:<16}{statistics.median(p50s):>10.2f}{statistics.median(p99s):>10.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--reads", type=int, default=300)
    ap.add_argument("--no-enclave", action="store_true", help="Only the verification rates.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cove-bench-") as tmp:
        try:
            tpm_paths = verification_rates(args, Path(tmp))
            if not args.no_enclave:
                quote_latency(args, Path(tmp), tpm_paths)
        finally:
            SwTpm(Paths(Path(tmp) / "tpm-platform").swtpm).stop()  # whatever happened above


if __name__ == "__main__":
    main()
