"""`cove run` start time of two versions of Cove's source, runs alternated so load drifts hit both.

Builds a small instance (hello + ls) with this checkout's `cove`, then runs
`cove run /bin/hello` with PYTHONPATH set to each source tree in turn (same
venv, same dependencies) and prints each tree's median and the ratio. Make
the trees with `git archive COMMIT src | tar -x -C DIR`.

    .venv/bin/python bench/startup_ab.py --before /tmp/before/src --after /tmp/after/src [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COVE = str(Path(sys.executable).parent / "cove")
HELLO = "int main(void) { return 0; }\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, type=Path, help="the baseline's src folder")
    parser.add_argument("--after", required=True, type=Path, help="the changed src folder")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cove-bench-ab-"))
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COVE_")}
        env["XDG_CONFIG_HOME"] = str(work / "config")
        hello = work / "hello"
        (work / "hello.c").write_text(HELLO)
        subprocess.run(["gcc", "-O2", "-static", "-o", str(hello), str(work / "hello.c")], check=True)
        for step in (["new", "app"], ["-C", "app", "add", "--to", "/bin", str(hello)], ["-C", "app", "build"]):
            subprocess.run([COVE, *step], cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)
        trees = {"before": args.before.resolve(), "after": args.after.resolve()}
        samples: dict[str, list[float]] = {name: [] for name in trees}
        for run in range(args.runs + 1):  # the first round warms both up and is not counted
            for name, src in trees.items():
                start = time.perf_counter()
                subprocess.run(
                    [COVE, "-C", "app", "run", "/bin/hello"],
                    cwd=work,
                    check=True,
                    env=dict(env, PYTHONPATH=str(src)),
                    stdout=subprocess.DEVNULL,
                )
                if run:
                    samples[name].append((time.perf_counter() - start) * 1000)
        before, after = (statistics.median(samples[n]) for n in ("before", "after"))
        print(f"runs per tree: {args.runs} (median, alternated)")
        print(f"before ({trees['before']}): {before:.1f} ms")
        print(f"after ({trees['after']}): {after:.1f} ms (x{after / before:.3f} before, {after - before:+.1f} ms)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
