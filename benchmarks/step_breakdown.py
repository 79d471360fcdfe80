"""Where a 5% MaskedAdamW step over set a (or b) spends its time, layer by layer, against AdamW(fused).

The #4 target is a MaskedAdamW step on 5% of the rows >= 10x faster than
torch.optim.AdamW(fused=True) over all of them.  This times, on the same
tensors (set a's or b's shapes, a random sorted 5% of each tensor's rows; slots 0..k-1
as a first selection gives them) and in one process:

- ``adamw_fused``: torch.optim.AdamW(fused=True).step() over every weight;
- ``masked_step``: MaskedAdamW.step() (torch.optim's step wrapper, the
  optimizer's Python, the backend kernel);
- ``public_op``: trust_fast.ops.masked_adamw_ on the optimizer's tensors (argument
  checks through their cache, the dispatcher);
- ``native_op``: torch.ops.trust_fast.masked_adamw_native_, the C++ kernel behind the
  dispatcher;
- ``cpp_loop``: the row update of benchmarks/row_access.cpp called through ctypes
  on raw pointers: the same arithmetic and next-row prefetch, no tensors, no
  dispatcher, no Python per tensor, one thread (compiled here with g++; skipped without it).

And the host costs that no kernel can remove, each on its own:

- ``empty_native``: the native op on the same tensor lists with no rows (the cost
  of handing 7 lists of every tensor to a C++ kernel through the dispatcher);
- ``optim_wrapper``: ``step()`` of a torch.optim.Optimizer that does nothing (the
  profiler record and hook checks every torch.optim step pays, fused AdamW too);
- ``grads_list``: ``[p.grad for p in params]``.

From these it prints ceilings: the ratio to AdamW(fused) that the op and
MaskedAdamW.step would reach with a kernel as fast as ``cpp_loop`` and no host
work beyond these floors.

Before every timed call a 256 MB buffer is read, as a training step's forward
and backward evict the caches (and the Python objects) between two optimizer
steps.  Medians of ``--repeats`` interleaved calls; ``fused/x`` = AdamW(fused)
time / contender time.

    python benchmarks/step_breakdown.py --repeats 31 [--set b] [--threads 2]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from ops_table import timed_together  # noqa: E402
from sd15_shapes import HARDCODED_A, HARDCODED_B, random_rows, row_count  # noqa: E402

from trust_fast import ops  # noqa: E402
from trust_fast.ops import _native  # noqa: E402
from trust_fast.optim import MaskedAdamW  # noqa: E402


def build_cpp_loop(workdir: str):
    """ctypes handle of row_access.cpp's row_access_update, or None (with the reason printed)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        print("cpp_loop skipped: no C++ compiler")
        return None
    lib = os.path.join(workdir, "librow_access.so")
    cmd = [cxx, "-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-DROW_ACCESS_LIB", "-shared", "-fPIC",
           os.path.join(HERE, "row_access.cpp"), "-o", lib]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"cpp_loop skipped: {' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        return None
    return ctypes.CDLL(lib).row_access_update


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", choices=("a", "b"), default="a", help="a: attn2 q/k/v (48 tensors); b: every "
                    "attention and FFN Linear (160 tensors, 242M weights, about 6 GB)")
    args = ap.parse_args(argv)
    if not 0 < args.fraction <= 1 or args.repeats < 1:
        raise SystemExit("--fraction must be in (0, 1] and --repeats >= 1")
    reason = _native.load()
    if reason is not None:
        raise SystemExit(f"the C++ extension is needed: {reason}")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    shapes = HARDCODED_A if args.set == "a" else HARDCODED_B
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    counts = [row_count(s[0], args.fraction) for s in shapes]
    opt = MaskedAdamW(params, lr=1e-5)
    opt.set_rows({p: random_rows(p.shape[0], args.fraction, gen) for p in params})
    opt.step()  # allocates the slots and checks the tensors once
    ((ps, state, _),) = opt._args[0]
    exp_avgs, exp_avg_sqs, steps, rows, slots = state
    grads = [p.grad for p in ps]
    if not all(torch.equal(s, torch.arange(len(s))) for s in slots):
        raise SystemExit("expected slots 0..k-1 for a first selection")
    hyper = (1e-5, 0.9, 0.999, 1e-8, 0.0)
    native = torch.ops.trust_fast.masked_adamw_native_
    fused = torch.optim.AdamW(params, lr=1e-5, fused=True)
    fused.step()
    no_rows = [r[:0] for r in rows]
    idle = _IdleOptimizer(params)
    fns = {
        "adamw_fused": fused.step,
        "masked_step": opt.step,
        "public_op": lambda: ops.masked_adamw_(ps, grads, *state, lr=hyper[0]),
        "native_op": lambda: native(ps, grads, *state, *hyper, None, None, 0.0),
        "empty_native": lambda: native(ps, grads, exp_avgs, exp_avg_sqs, steps, no_rows, no_rows, *hyper, None, None, 0.0),
        "optim_wrapper": idle.step,
        "grads_list": lambda: [p.grad for p in ps],
    }
    with tempfile.TemporaryDirectory() as tmp:
        loop = build_cpp_loop(tmp)
        if loop is not None:
            n = len(ps)
            fp = ctypes.POINTER(ctypes.c_float)
            ptrs = lambda ts: (fp * n)(*[ctypes.cast(t.data_ptr(), fp) for t in ts])  # noqa: E731
            cargs = (ctypes.c_int64(n), ptrs(ps), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs),
                     (ctypes.c_int64 * n)(*[p.numel() // p.shape[0] for p in ps]),
                     (ctypes.c_int64 * n)(*[r.numel() for r in rows]),
                     (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(r.data_ptr(), ctypes.POINTER(ctypes.c_int64)) for r in rows]))
            fns["cpp_loop"] = lambda: loop(*cargs)
        flush = torch.ones(64 << 20)
        res = timed_together(fns, args.repeats, before=lambda: float(flush.sum()))
    med = {k: m for k, (m, _) in res.items()}
    n_sel = sum(k * (p.numel() // p.shape[0]) for k, p in zip(counts, params))
    print(f"set {args.set}: {len(params)} tensors, {sum(p.numel() for p in params):,} weights; {args.fraction:.0%} of rows = "
          f"{n_sel:,} elements; {args.threads} thread(s), medians of {args.repeats}, caches flushed before each call")
    print(f"{'contender':13s} {'median ms':>10s} {'min ms':>8s} {'fused/x':>8s}")
    for k, (m, lo) in res.items():
        print(f"{k:13s} {m:10.3f} {lo:8.3f} {med['adamw_fused'] / m:8.2f}")
    if "cpp_loop" in med:
        op_floor = med["cpp_loop"] + med["empty_native"]
        step_floor = op_floor + med["optim_wrapper"] + med["grads_list"]
        print(f"ceiling of the op (cpp_loop + empty_native):                    {op_floor:.3f} ms = "
              f"{med['adamw_fused'] / op_floor:.2f}x")
        print(f"ceiling of MaskedAdamW.step (+ optim_wrapper + grads_list):     {step_floor:.3f} ms = "
              f"{med['adamw_fused'] / step_floor:.2f}x")
    return 0


class _IdleOptimizer(torch.optim.Optimizer):
    """A torch.optim optimizer whose step does nothing: what torch.optim's step wrapper costs."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


if __name__ == "__main__":
    raise SystemExit(main())
