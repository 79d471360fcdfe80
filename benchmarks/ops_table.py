"""CPU benchmark of the trust_fast ops on Stable Diffusion 1.5 UNet weight shapes.

Sets (see sd15_shapes.py): a = attn2 q/k/v (31.6M params), b = attention + FFN
Linear weights (242M), c = all Linear + Conv2d weights (859M; about 17 GB peak
with dense AdamW, run it alone).  Weights and gradients are random tensors of
those shapes.  For each set, at one thread count:

- row_saliency: eager torch loop vs the reference and compiled (cpp) backends
- optimizer step: torch.optim.AdamW foreach and fused, SalUn-style (grad *= mask,
  then AdamW foreach over everything), MaskedAdamW at 1/5/25/100% of the rows;
  plus MaskedAdamW.set_rows time and optimizer state bytes.  Contenders compared
  by a ratio are timed interleaved (round-robin), so load from other processes
  on a shared machine falls on all of them alike.

Writes one CSV row per measurement (median of --repeats after a warm-up) and
prints a table.  Usage:

    python benchmarks/ops_table.py --sets a b --threads 1
    python benchmarks/ops_table.py --sets c --threads 1 --append
"""

from __future__ import annotations

import argparse
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
from sd15_shapes import random_rows, summary, unet_shapes  # noqa: E402

import trust_fast.ops as ops  # noqa: E402
from trust_fast.io import write_csv_atomic  # noqa: E402
from trust_fast.optim import MaskedAdamW  # noqa: E402

FIELDS = [
    "set", "params", "rows", "threads", "op", "impl", "fraction", "median_ms", "min_ms",
    "baseline", "speedup_vs_baseline", "state_bytes", "state_vs_dense",
]


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, min) wall time in ms over ``repeats`` calls after one warm-up call."""
    return timed_together({"f": fn}, repeats)["f"]


def timed_together(fns: dict[str, Callable[[], object]], repeats: int,
                   before: Callable[[], object] | None = None) -> dict[str, tuple[float, float]]:
    """(median, min) ms of each function, calls interleaved round-robin so that load from
    other processes on a shared machine hits every contender alike.  ``before`` (untimed)
    runs ahead of every timed call, e.g. to flush the caches."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


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
    def saliency_with(impl):
        def run():
            with ops.use_backend(impl):
                return ops.row_saliency(grads)
        return run

    sal = timed_together(
        {"eager_loop": lambda: [g.abs().flatten(1).mean(1) for g in grads],
         "reference": saliency_with("reference"), "cpp": saliency_with("cpp")},
        repeats,
    )
    row("row_saliency", "eager_loop", sal["eager_loop"])
    for impl in ("reference", "cpp"):
        row("row_saliency", impl, sal[impl], baseline="eager_loop", speedup=sal["eager_loop"][0] / sal[impl][0])

    # ---- slow dense baselines (6x and more behind fused: timed on their own)
    dense_bytes = 2 * 4 * n_params
    foreach = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    foreach_ms = timed(foreach.step, max(2, repeats // 2))
    del foreach
    # SalUn: static 50% mask over every weight, grad *= mask, dense AdamW (foreach) over everything
    masks = [torch.rand(p.shape, generator=gen) < 0.5 for p in params]  # bool: 1 byte per weight
    salun = torch.optim.AdamW(params, lr=1e-5, foreach=True)

    def salun_step():
        torch._foreach_mul_(grads, masks)
        salun.step()

    salun_ms = timed(salun_step, max(2, repeats // 2))
    salun_bytes = dense_state_bytes(salun) + sum(m.numel() * m.element_size() for m in masks)
    del salun, masks
    gc.collect()
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    grads = [p.grad for p in params]

    # ---- fused AdamW and MaskedAdamW at each row fraction, interleaved
    fused = torch.optim.AdamW(params, lr=1e-5, fused=True)
    contenders: dict[str, Callable[[], object]] = {"adamw_fused": fused.step}
    masked: dict[float, MaskedAdamW] = {}
    set_ms: dict[float, tuple[float, float]] = {}
    for frac in fractions:
        rows = {p: random_rows(p.shape[0], frac, gen) for p in params}
        opt = MaskedAdamW(params, lr=1e-5)
        set_ms[frac] = timed(lambda: opt.set_rows(rows), repeats)
        masked[frac] = opt
        contenders[f"masked_{frac}"] = opt.step
    res = timed_together(contenders, repeats)
    fused_ms = res["adamw_fused"][0]
    row("adamw_step", "adamw_fused", res["adamw_fused"], fraction=1.0, state=dense_state_bytes(fused), state_ratio=1.0)
    row("adamw_step", "adamw_foreach", foreach_ms, fraction=1.0, baseline="adamw_fused",
        speedup=fused_ms / foreach_ms[0], state=dense_bytes, state_ratio=1.0)
    row("adamw_step", "salun_mask_foreach", salun_ms, fraction=0.5, baseline="adamw_fused",
        speedup=fused_ms / salun_ms[0], state=salun_bytes, state_ratio=salun_bytes / dense_bytes)
    for frac, opt in masked.items():
        state = opt.state_bytes()
        row("masked_adamw", "cpp", res[f"masked_{frac}"], fraction=frac, baseline="adamw_fused",
            speedup=fused_ms / res[f"masked_{frac}"][0], state=state, state_ratio=state / dense_bytes)
        row("set_rows", "MaskedAdamW.set_rows", set_ms[frac], fraction=frac)
    del fused, masked, contenders
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
    write_csv_atomic([{k: r[k] for k in FIELDS} for r in rows], str(args.out), append=args.append)
    print_table(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
