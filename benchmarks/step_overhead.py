"""Host cost of one optimizer step, apart from the arithmetic: MaskedAdamW vs AdamW.

At small row fractions a MaskedAdamW step moves little data, so what the host
spends per tensor (Python, argument checks, the dispatcher) is a large part of
it, and on a GPU all of it: the kernel of a 5% step over set a takes 34 us on
an H100 (BENCHMARKS.md).  This times steps over as many tensors as the SD 1.5
sets have (a: 48, b: 160, c: 282), each tensor tiny (8 x 64, one row
selected), so that the time is the host's:

- ``masked_step``: ``MaskedAdamW.step()``, which checks its tensors through
  the op once per row set and then calls the backend kernel directly;
- ``masked_step_via_op``: the same optimizer with every step through the
  public op ``trust_fast.ops.masked_adamw_`` (its argument checks, the
  dispatcher), as every step ran before the direct call;
- ``masked_relocalize``: ``set_rows`` with another of 4 row sets, then
  ``step()``: what the engine's default (re-localizing every step) costs once
  every row set has its slots;
- ``adamw_fused``, ``adamw_foreach``: torch.optim.AdamW over the same tensors.

``warm``: back-to-back calls.  ``cold``: a 256 MB buffer is read before each
call, as a training step's forward and backward evict the caches between two
optimizer steps.  Medians of ``--repeats`` calls, contenders interleaved.

    python benchmarks/step_overhead.py --repeats 200
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ops_table import timed_together  # noqa: E402

from trust_fast import ops  # noqa: E402
from trust_fast.io import write_csv_atomic  # noqa: E402
from trust_fast.optim import MaskedAdamW  # noqa: E402

SETS = {"a": 48, "b": 160, "c": 282}


def contenders(n_tensors: int) -> dict:
    gen = torch.Generator().manual_seed(0)

    def params():
        ps = [torch.nn.Parameter(torch.randn(8, 64, generator=gen)) for _ in range(n_tensors)]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        return ps

    def masked(via_op: bool):
        ps = params()
        opt = MaskedAdamW(ps, lr=1e-5)
        if via_op:
            opt._update = lambda *a, **k: ops.masked_adamw_(*a, **k)  # not the op object: every step through it
        opt.set_rows({p: torch.tensor([3]) for p in ps})
        return opt.step

    def relocalize():
        ps = params()
        opt = MaskedAdamW(ps, lr=1e-5)
        sets = itertools.cycle([{p: torch.tensor([r]) for p in ps} for r in (1, 3, 5, 7)])

        def step():
            opt.set_rows(next(sets))
            opt.step()

        for _ in range(4):  # every row set gets its slots
            step()
        return step

    return {
        "masked_step": masked(False),
        "masked_step_via_op": masked(True),
        "masked_relocalize": relocalize(),
        "adamw_fused": torch.optim.AdamW(params(), lr=1e-5, fused=True).step,
        "adamw_foreach": torch.optim.AdamW(params(), lr=1e-5, foreach=True).step,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", nargs="+", choices=sorted(SETS), default=sorted(SETS))
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="CSV file for the rows (written through a temp file)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    flush = torch.ones(64 << 20)  # 256 MB
    rows = []
    print(f"host cost of one step, median us of {args.repeats} calls ({args.threads} thread(s); 8 x 64 tensors, 1 row each)")
    print(f"{'set':4s} {'tensors':>7s} {'cache':5s} " + " ".join(f"{k:>18s}" for k in contenders(1)))
    for s in args.sets:
        fns = contenders(SETS[s])
        for cache, before in (("warm", None), ("cold", lambda: float(flush.sum()))):
            res = timed_together(fns, args.repeats if before is None else max(1, args.repeats // 4), before)
            med = {k: ms * 1e3 for k, (ms, _) in res.items()}  # us
            print(f"{s:4s} {SETS[s]:7d} {cache:5s} " + " ".join(f"{med[k]:18.1f}" for k in fns))
            rows += [dict(set=s, tensors=SETS[s], cache=cache, contender=k, median_us=f"{v:.1f}") for k, v in med.items()]
    if args.out:
        write_csv_atomic(rows, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
