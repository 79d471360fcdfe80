"""Host work of the triton masked AdamW per call, without the kernel: stateless call vs a reused plan.

The triton backend builds per-tensor offset tables and concatenates rows and
slots on the host before its launches.  The stateless backend kernel (what the
op calls) does that on every call; ``MaskedAdamW`` keeps a
``MaskedAdamWPlan`` per row set and pays per step only for reading the
params' and gradients' addresses.  This times both on the SD 1.5 shapes of
sets a and b (5% of the rows), with the Triton launch itself replaced by a
no-op, so that only host work is measured and no GPU is needed.  The tensors
are CPU tensors; on a GPU the stateless call also pays a pinned-memory copy of
its table and two concatenation kernels per launch group, which the plan skips.

    python benchmarks/triton_plan_host.py --repeats 50
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ops_table import timed_together  # noqa: E402
from sd15_shapes import HARDCODED_A, HARDCODED_B, random_rows  # noqa: E402


class _NoLaunch:
    """Stands in for the @triton.jit kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--sets", nargs="+", choices=["a", "b"], default=["a", "b"])
    args = ap.parse_args(argv)
    if args.repeats < 1 or not 0 < args.fraction <= 1:
        raise SystemExit("--repeats must be >= 1 and --fraction in (0, 1]")
    try:
        import trust_fast.kernels.masked_adamw as K
    except ImportError as exc:
        raise SystemExit(f"needs triton: {exc}") from exc
    real = K._masked_adamw_kernel
    K._masked_adamw_kernel = _NoLaunch()
    try:
        print(f"host ms per masked_adamw_ call, triton backend, launch replaced by a no-op; medians of {args.repeats}, interleaved")
        print(f"{'set':4s} {'tensors':>7s} {'stateless':>10s} {'plan, same grads':>17s} {'plan, new grads':>16s}")
        for name in args.sets:
            shapes = HARDCODED_A if name == "a" else HARDCODED_B
            gen = torch.Generator().manual_seed(0)
            params = [torch.zeros(s) for s in shapes]
            grads = [[torch.zeros(s) for s in shapes] for _ in range(2)]  # two gradient sets: new tensors each step
            rows = [random_rows(s[0], args.fraction, gen) for s in shapes]
            ms = [torch.zeros(r.numel(), p.numel() // p.shape[0]) for r, p in zip(rows, params)]
            vs = [torch.zeros_like(m) for m in ms]
            steps = [torch.zeros(r.numel()) for r in rows]
            slots = [torch.arange(r.numel()) for r in rows]
            hyper = (1e-5, 0.9, 0.999, 1e-8, 0.0)
            # one plan per contender: interleaved, a shared plan would see the gradients move every call
            plan_same, plan_new = (K.MaskedAdamWPlan(params, ms, vs, steps, rows, slots) for _ in range(2))
            flips = iter(range(1 << 62))
            calls = {
                "stateless": lambda: K.masked_adamw_(params, grads[0], ms, vs, steps, rows, slots, *hyper, None, None, 0.0),
                "same": lambda: plan_same(params, grads[0], *hyper, 0.0),
                "new": lambda: plan_new(params, grads[next(flips) % 2], *hyper, 0.0),
            }
            med = {k: m for k, (m, _) in timed_together(calls, args.repeats).items()}
            print(f"{name:4s} {len(shapes):7d} {med['stateless']:10.3f} {med['same']:17.3f} {med['new']:16.3f}")
    finally:
        K._masked_adamw_kernel = real
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
