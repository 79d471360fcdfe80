"""CPU benchmark of the trust_fast ops on Stable Diffusion 1.5 UNet weight shapes.

Sets (see sd15_shapes.py): a = attn2 q/k/v (31.6M params), b = attention + FFN
Linear weights (242M), c = all Linear + Conv2d weights (859M; about 17 GB peak
with dense AdamW, run it alone).  Weights and gradients are random tensors of
those shapes.  For each set, at one thread count:

- row_saliency: eager torch loop vs the reference and compiled (cpp) backends
- optimizer step: torch.optim.AdamW foreach and fused, SalUn-style (grad *= mask,
  then AdamW foreach over everything), MaskedAdamW at 1/5/25/100% of the rows;
  plus MaskedAdamW.set_rows time and optimizer state bytes.

Writes one CSV row per measurement (median of --repeats after a warm-up) and
prints a table.  Usage:

    python benchmarks/ops_table.py --sets a b --threads 1
    python benchmarks/ops_table.py --sets c --threads 1 --append
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd15_shapes import unet_shapes, summary  # noqa: E402

import trust_fast.ops as ops  # noqa: E402
from trust_fast.optim import MaskedAdamW  # noqa: E402

FIELDS = [
    "set", "params", "rows", "threads", "op", "impl", "fraction", "median_ms", "min_ms",
    "baseline", "speedup_vs_baseline", "state_bytes", "state_vs_dense",
]


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, min) wall time in ms over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def dense_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def bench_set(name: str, shapes: list[tuple[int, ...]], threads: int, repeats: int, fractions: list[float]) -> list[dict]:
    torch.set_num_threads(threads)
    n_params, n_rows = summary(shapes)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    grads = [p.grad for p in params]
    base = dict(set=name, params=n_params, rows=n_rows, threads=threads)
    out: list[dict] = []

    def row(op, impl, ms, fraction="", baseline="", speedup="", state="", state_ratio=""):
        out.append({**base, "op": op, "impl": impl, "fraction": fraction, "median_ms": f"{ms[0]:.2f}",
                    "min_ms": f"{ms[1]:.2f}", "baseline": baseline,
                    "speedup_vs_baseline": f"{speedup:.2f}" if speedup != "" else "",
                    "state_bytes": state, "state_vs_dense": f"{state_ratio:.4f}" if state_ratio != "" else ""})
        print(f"  {name} {op:14s} {impl:22s} {str(fraction):5s} median {ms[0]:9.2f} ms"
              + (f"  x{speedup:.2f} vs {baseline}" if speedup != "" else ""), flush=True)

    # ---- row saliency
    eager = timed(lambda: [g.abs().flatten(1).mean(1) for g in grads], repeats)
    row("row_saliency", "eager_loop", eager)
    for impl in ("reference", "cpp"):
        with ops.use_backend(impl):
            ms = timed(lambda: ops.row_saliency(grads), repeats)
        row("row_saliency", impl, ms, baseline="eager_loop", speedup=eager[0] / ms[0])

    # ---- dense optimizers
    fused_ms = None
    dense_bytes = None
    for impl, kwargs in (("adamw_fused", dict(fused=True)), ("adamw_foreach", dict(foreach=True))):
        opt = torch.optim.AdamW(params, lr=1e-5, **kwargs)
        ms = timed(opt.step, repeats)
        dense_bytes = dense_state_bytes(opt)
        if impl == "adamw_fused":
            fused_ms = ms[0]
            row("adamw_step", impl, ms, fraction=1.0, state=dense_bytes, state_ratio=1.0)
        else:
            row("adamw_step", impl, ms, fraction=1.0, baseline="adamw_fused", speedup=fused_ms / ms[0],
                state=dense_bytes, state_ratio=1.0)
        del opt
        gc.collect()

    # SalUn: static 50% mask over every weight, grad *= mask, dense AdamW (foreach) over everything
    masks = [(torch.rand(p.shape, generator=gen) < 0.5).float() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)

    def salun_step():
        torch._foreach_mul_(grads, masks)
        opt.step()

    ms = timed(salun_step, repeats)
    row("adamw_step", "salun_mask_foreach", ms, fraction=0.5, baseline="adamw_fused", speedup=fused_ms / ms[0],
        state=dense_state_bytes(opt) + sum(m.numel() * m.element_size() for m in masks), state_ratio="")
    del opt, masks
    gc.collect()
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    grads = [p.grad for p in params]

    # ---- MaskedAdamW at row fractions
    for frac in fractions:
        rows = {p: torch.randperm(p.shape[0], generator=gen)[: max(1, round(frac * p.shape[0]))].sort().values
                for p in params}
        opt = MaskedAdamW(params, lr=1e-5)
        set_ms = timed(lambda: opt.set_rows(rows), repeats)
        ms = timed(opt.step, repeats)
        state = opt.state_bytes()
        row("masked_adamw", "cpp", ms, fraction=frac, baseline="adamw_fused", speedup=fused_ms / ms[0],
            state=state, state_ratio=state / dense_bytes)
        row("set_rows", "MaskedAdamW.set_rows", set_ms, fraction=frac)
        del opt
        gc.collect()
    return out


def print_table(rows: list[dict]) -> None:
    head = ["set", "threads", "op", "impl", "fraction", "median_ms", "speedup_vs_baseline", "state_vs_dense"]
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in head]
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(r[h]).ljust(w) for h, w in zip(head, widths)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["a", "b"], choices=["a", "b", "c"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.05, 0.25, 1.0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "ops.csv")
    ap.add_argument("--append", action="store_true", help="append to the CSV instead of overwriting it")
    args = ap.parse_args(argv)
    assert ops.backend_for("cpu") == "cpp", "the compiled CPU backend is not available: build trust_fast._C first"
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, backend {ops.backend_for('cpu')}")
    shapes = unet_shapes()
    rows: list[dict] = []
    for threads in args.threads:
        for s in args.sets:
            rows += bench_set(s, shapes[s], threads, args.repeats, args.fractions)
            gc.collect()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new = not (args.append and args.out.exists())
    with args.out.open("w" if new else "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)
    print_table(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
