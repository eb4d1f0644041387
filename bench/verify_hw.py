"""Verifications per second per core of hardware evidence, with warm collateral.

Each evidence type is set against the raw rate of the signature checks it
needs, measured in the same run, to show what the parsing and policy around
``cryptography`` cost. Prints figures; asserts nothing. Run:
``python bench/verify_hw.py [--runs 5] [--seconds 0.5]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from cove.attest.dcap import verify_dcap_quote
from cove.attest.dcap_collateral import parse_collateral
from cove.attest.snp import verify_snp_report
from cove.attest.tpm import verify_tpm_quote

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "data" / "vectors"


def rate(fn, seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds`` (one core: one thread)."""
    n, start = 0, time.perf_counter()
    while True:
        for _ in range(10):
            fn()
        n += 10
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


def primitives():
    """Raw verify callables for the primitives the evidence uses."""
    data = b"x" * 600
    out = {}
    for name, curve, h in (
        ("ECDSA P-256/SHA-256", ec.SECP256R1(), hashes.SHA256()),
        ("ECDSA P-384/SHA-384", ec.SECP384R1(), hashes.SHA384()),
    ):
        k = ec.generate_private_key(curve)
        sig, pub = k.sign(data, ec.ECDSA(h)), k.public_key()
        out[name] = lambda pub=pub, sig=sig, h=h: pub.verify(sig, data, ec.ECDSA(h))
    k = rsa.generate_private_key(65537, 2048)
    sig, pub = k.sign(data, padding.PKCS1v15(), hashes.SHA256()), k.public_key()
    out["RSA-2048 PKCS#1 v1.5"] = lambda: pub.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
    k4 = rsa.generate_private_key(65537, 4096)
    pss = padding.PSS(padding.MGF1(hashes.SHA384()), 48)
    sig4, pub4 = k4.sign(data, pss, hashes.SHA384()), k4.public_key()
    out["RSA-4096 PSS/SHA-384"] = lambda: pub4.verify(sig4, data, pss, hashes.SHA384())
    return out


def evidence():
    """(name, verify callable, {primitive: count per verification})."""
    v = lambda rel: (VECTORS / rel).read_bytes()  # noqa: E731
    root = v("intel_sgx_root_ca.pem")
    out = []
    for tee, t in (
        ("sgx", datetime(2025, 6, 19, 11, 56, 11, tzinfo=timezone.utc)),
        ("tdx", datetime(2025, 6, 19, 11, 16, 3, tzinfo=timezone.utc)),
    ):
        quote = v(f"{tee}/quote.bin")
        col = parse_collateral(json.loads(v(f"{tee}/collateral.json")))  # warm: parsed once
        # PCK chain 3 (leaf, CA, root self) + 2 CRLs + TCB info (chain 2, body 1)
        # + QE identity (chain 2, body 1) + QE report 1 + quote 1.
        out.append(
            (
                f"{tee.upper()} quote",
                lambda q=quote, c=col, t=t: verify_dcap_quote(q, c, root, t),
                {"ECDSA P-256/SHA-256": 13},
            )
        )
    report, vcek, chain = v("snp/report.bin"), v("snp/vcek.der"), v("snp/ask_ark_milan.pem")
    now = datetime(2026, 11, 15, tzinfo=timezone.utc)
    # report 1 P-384; VCEK by ASK, ASK by ARK, ARK self: 3 RSA-4096 PSS.
    out.append(
        (
            "SNP report",
            lambda: verify_snp_report(report, vcek, chain, now),
            {"ECDSA P-384/SHA-384": 1, "RSA-4096 PSS/SHA-384": 3},
        )
    )
    a, s, p, k = v("tpm/quote_attest.bin"), v("tpm/quote_sig.bin"), v("tpm/quote_pcrs.bin"), v("tpm/ak_pub.pem")
    nonce = v("tpm/nonce.txt").strip()
    out.append(("TPM quote", lambda: verify_tpm_quote(a, s, p, k, nonce), {"RSA-2048 PKCS#1 v1.5": 1}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.5)
    args = ap.parse_args()
    prims, evs = primitives(), evidence()
    prim_rates = {n: [] for n in prims}
    ev_rates = {n: [] for n, _, _ in evs}
    for _ in range(args.runs):  # interleaved so drift hits both alike
        for n, fn in prims.items():
            prim_rates[n].append(rate(fn, args.seconds))
        for n, fn, _ in evs:
            ev_rates[n].append(rate(fn, args.seconds))
    med = {n: statistics.median(r) for n, r in prim_rates.items()}
    print(f"median of {args.runs} runs, {args.seconds}s each, one core\n")
    print(f"{'primitive':<24}{'verifies/s':>12}")
    for n, r in med.items():
        print(f"{n:<24}{r:>12,.0f}")
    print(f"\n{'evidence':<12}{'verifies/s':>12}{'crypto bound/s':>16}{'ratio':>8}  signature checks")
    for n, _, needs in evs:
        got = statistics.median(ev_rates[n])
        bound = 1 / sum(k / med[p] for p, k in needs.items())
        checks = ", ".join(f"{k}x {p}" for p, k in needs.items())
        print(f"{n:<12}{got:>12,.0f}{bound:>16,.0f}{got / bound:>8.2f}  {checks}")


if __name__ == "__main__":
    main()
