"""Start-up cost of the library and the CLI: wall seconds of fresh processes (median of N).

    python benchmarks/startup.py --repeats 7

Rows: `import trust_fast` (lazy: loads no torch), `import trust_fast; trust_fast.TrustUnlearner`
(what the first real use pays: torch and diffusers), `trust-fast --help` and `trust-fast unlearn --help`.
Targets (issue #18): import <= 1.5 s, --help <= 2 s on the 2-core CI machine.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

CASES = [
    ("import trust_fast", [sys.executable, "-c", "import trust_fast"]),
    ("import trust_fast; trust_fast.TrustUnlearner", [sys.executable, "-c", "import trust_fast; trust_fast.TrustUnlearner"]),
    ("trust-fast --help", ["trust-fast", "--help"]),
    ("trust-fast unlearn --help", ["trust-fast", "unlearn", "--help"]),
]


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    if shutil.which("trust-fast") is None:
        raise SystemExit("trust-fast is not on PATH: pip install -e . first")
    print("| what | median s | min s | max s | runs |\n| --- | --- | --- | --- | --- |")
    for name, cmd in CASES:
        timed(cmd)  # warm the file cache
        xs = [timed(cmd) for _ in range(a.repeats)]
        print(f"| `{name}` | {statistics.median(xs):.2f} | {min(xs):.2f} | {max(xs):.2f} | {a.repeats} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
