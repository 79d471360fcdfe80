"""Where MaskedAdamW's time goes at a small row fraction: access pattern or loop.

Times, interleaved in one run, over the SD 1.5 weight shapes of set a or b (random init):

- ``adamw_fused``: torch.optim.AdamW(fused=True) over every weight (the #4 baseline);
- ``masked_scattered``: MaskedAdamW on a random ``--fraction`` of each tensor's rows (as ops_table);
- ``masked_contiguous``: MaskedAdamW on the first ``--fraction`` of each tensor's rows, the same
  number of elements read in one stream per tensor;
- ``fused_on_fraction``: AdamW(fused=True) over dense tensors holding only that many rows, the
  best a streaming update of the same element count does.

Each contender's ratio is ``adamw_fused / contender`` (higher is faster), medians of ``--repeats``
round-robin calls so that load from other processes hits all alike.

    python benchmarks/row_pattern.py --set a --threads 1 --repeats 15
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ops_table import timed_together  # noqa: E402
from sd15_shapes import HARDCODED_A, HARDCODED_B, random_rows, row_count  # noqa: E402

from trust_fast.optim import MaskedAdamW  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", choices=["a", "b"], default="a")
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    if not 0 < args.fraction <= 1:
        raise SystemExit(f"--fraction must be in (0, 1], got {args.fraction}")
    torch.set_num_threads(args.threads)
    shapes = HARDCODED_A if args.set == "a" else HARDCODED_B
    gen = torch.Generator().manual_seed(0)

    def with_grads(tensors):
        params = [torch.nn.Parameter(t) for t in tensors]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        return params

    params = with_grads([torch.randn(s, generator=gen) * 0.02 for s in shapes])
    counts = [row_count(s[0], args.fraction) for s in shapes]

    def masked(rows_of):
        opt = MaskedAdamW(params, lr=1e-5)
        opt.set_rows({p: rows_of(p, k) for p, k in zip(params, counts)})
        return opt

    scattered = masked(lambda p, k: random_rows(p.shape[0], args.fraction, gen))
    contiguous = masked(lambda p, k: torch.arange(k))
    small = with_grads([torch.randn(k, *s[1:], generator=gen) * 0.02 for k, s in zip(counts, shapes)])
    contenders = {
        "adamw_fused": torch.optim.AdamW(params, lr=1e-5, fused=True).step,
        "masked_scattered": scattered.step,
        "masked_contiguous": contiguous.step,
        "fused_on_fraction": torch.optim.AdamW(small, lr=1e-5, fused=True).step,
    }
    med = {k: m for k, (m, _) in timed_together(contenders, args.repeats).items()}
    n_sel = sum(k * (s.numel() // s.shape[0]) for k, s in zip(counts, params))
    print(f"set {args.set}: {len(shapes)} tensors, {sum(p.numel() for p in params):,} weights; "
          f"{args.fraction:.0%} of rows = {n_sel:,} elements; {args.threads} thread(s), {args.repeats} repeats")
    print(f"{'contender':18s} {'median ms':>10s} {'fused/x':>8s} {'G elem/s':>9s}")
    for k, m in med.items():
        n = sum(p.numel() for p in params) if k == "adamw_fused" else n_sel
        print(f"{k:18s} {m:10.2f} {med['adamw_fused'] / m:8.2f} {n / m / 1e6:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
