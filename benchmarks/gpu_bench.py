"""GPU correctness check and benchmark of the trust_fast ops (run by benchmarks/gpu_check.sh).

--check: every CUDA backend (cuda, triton) against the reference and a float64
oracle on awkward shapes and dtypes (a pytest-free subset of tests/ops/test_ops_kernels.py).
--bench: times reference / cuda / triton with triton.testing.do_bench (median) on
SD 1.5 weight shapes (sets a, b, c from sd15_unet_shapes.json, no diffusers
needed) and reports achieved bandwidth against a measured device-to-device copy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd15_shapes import random_rows, stored_shapes, summary  # noqa: E402

import trust_fast.ops as ops  # noqa: E402
from trust_fast.io import write_csv_atomic  # noqa: E402
from trust_fast.ops.registry import get_backend  # noqa: E402
from trust_fast.optim import MaskedAdamW  # noqa: E402

# A dry run on a CPU (--device cpu, TRITON_INTERPRET=1) exercises this script with cpp/triton.
DEV = torch.device("cuda")
GPU_BACKENDS: tuple[str, ...] = ("cuda", "triton")


# ----------------------------------------------------------------------------- check


def _flash(out, oracle, plain, what):
    oracle = oracle.double()
    err = (out.double() - oracle).abs().max().item() if out.numel() else 0.0
    base = (plain.double() - oracle).abs().max().item() if out.numel() else 0.0
    floor = 8 * torch.finfo(torch.float32).eps * max(1.0, oracle.abs().max().item() if oracle.numel() else 1.0)
    ok = err <= 2 * base + floor
    print(f"  {'ok  ' if ok else 'FAIL'} {what}: err {err:.3g} plain {base:.3g}")
    return ok


def check() -> bool:
    shapes = [(1, 1), (7, 13), (3, 5, 3, 3), (17,), (2, 1000), (33, 65), (320, 768), (40, 2560 * 9)]
    gen = torch.Generator().manual_seed(0)
    ok = True
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        gs = [torch.randn(s, generator=gen).to(DEV, dtype) for s in shapes]
        ws = [torch.randn(s, generator=gen).to(DEV, dtype) for s in shapes]
        for mode in ("g", "gw"):
            oracle = torch.cat([((g.double() * w.double()) if mode == "gw" else g.double()).abs().reshape(g.shape[0], -1).mean(1)
                                for g, w in zip(gs, ws)])
            with ops.use_backend("reference"):
                plain = ops.row_saliency(gs, ws if mode == "gw" else None, mode)
            for b in GPU_BACKENDS:
                with ops.use_backend(b):
                    out = ops.row_saliency(gs, ws if mode == "gw" else None, mode)
                ok &= _flash(out, oracle, plain, f"row_saliency {b} {dtype} {mode}")
        for penalty in ("none", "per_row", "per_element"):
            rows, slots, ms, vs, steps, hs, p0s = [], [], [], [], [], [], []
            params = [torch.randn(s, generator=gen).to(DEV, dtype) for s in shapes]
            grads = [torch.randn(s, generator=gen).to(DEV, dtype) for s in shapes]
            for i, s in enumerate(shapes):
                R, C = s[0], (params[i].numel() // s[0])
                r = torch.randperm(R, generator=gen)[: max(1, (R * (i % 3 + 1)) // 3)]
                rows.append(r.to(DEV, torch.int32 if i % 2 else torch.int64))
                slots.append(torch.randperm(R + 1, generator=gen)[: r.numel()].to(DEV))
                ms.append(torch.rand(R + 1, C, generator=gen).to(DEV) * 0.1)
                vs.append(torch.rand(R + 1, C, generator=gen).to(DEV) * 0.01)
                steps.append(torch.randint(0, 4, (R + 1,), generator=gen).float().to(DEV))
                hs.append(torch.rand(s if penalty == "per_element" else (R,), generator=gen).to(DEV))
                p0s.append(torch.randn(s, generator=gen).to(DEV, dtype))
            kw = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
            if penalty != "none":
                kw.update(hess=hs, ref_params=p0s, lam=0.5)
            results = {}
            for b in ("reference",) + GPU_BACKENDS:
                st = [[x.clone() for x in xs] for xs in (params, ms, vs, steps)]
                with ops.use_backend(b):
                    ops.masked_adamw_(st[0], grads, st[1], st[2], st[3], rows, slots, **kw)
                results[b] = st
            # float64 oracle: the reference run in double
            st64 = [[x.double().clone() for x in xs] for xs in (params, ms, vs, steps)]
            for i in range(len(shapes)):
                p2 = st64[0][i].view(shapes[i][0], -1)
                r, s_ = rows[i].long(), slots[i].long()
                g = grads[i].double().reshape(shapes[i][0], -1)[r]
                x = p2[r]
                if penalty != "none":
                    g = g + 0.5 * hs[i].double().reshape(shapes[i][0], -1)[r] * (x - p0s[i].double().reshape(shapes[i][0], -1)[r])
                t = st64[3][i][s_] + 1
                st64[3][i][s_] = t
                m = st64[1][i][s_] * 0.9 + 0.1 * g
                v = st64[2][i][s_] * 0.99 + 0.01 * g * g
                st64[1][i][s_], st64[2][i][s_] = m, v
                bc1, bc2 = (1 - 0.9**t).unsqueeze(1), (1 - 0.99**t).unsqueeze(1)
                p2[r] = x * (1 - 0.01 * 0.1) - 0.01 / bc1 * m / (v.sqrt() / bc2.sqrt() + 1e-8)
            for b in GPU_BACKENDS:
                for k, name in enumerate(("param", "exp_avg", "exp_avg_sq", "step")):
                    for i in range(len(shapes)):
                        got, plain, want = results[b][k][i], results["reference"][k][i], st64[k][i]
                        good = bool((got.double() - want).abs().max() <= 2 * (plain.double() - want).abs().max()
                                    + 8 * torch.finfo(torch.float32).eps * max(1.0, want.abs().max().item()))
                        if not good:
                            print(f"  FAIL masked_adamw {b} {dtype} {penalty} {name} tensor {i}")
                        ok &= good
                print(f"  {'ok  ' if ok else 'FAIL'} masked_adamw {b} {dtype} {penalty}")
                for i in range(len(shapes)):  # rows not listed are bit-identical
                    keep = torch.ones(shapes[i][0], dtype=torch.bool, device=DEV)
                    keep[rows[i].long()] = False
                    same = torch.equal(results[b][0][i].view(shapes[i][0], -1)[keep], params[i].view(shapes[i][0], -1)[keep])
                    if not same:
                        print(f"  FAIL masked_adamw {b} {dtype} {penalty}: unselected rows changed in tensor {i}")
                    ok &= same
        hz = [torch.randn(s, generator=gen).to(DEV, dtype) for s in shapes]
        z = [(torch.randint(0, 2, s, generator=gen) * 2 - 1).to(DEV, dtype) for s in shapes]
        for per_row in (False, True):
            base = [torch.rand(s[0] if per_row else s, generator=gen).to(DEV) for s in shapes]
            rows = [torch.randperm(s[0], generator=gen)[: (s[0] + 1) // 2].to(DEV) for s in shapes]
            outs = {}
            for b in ("reference",) + GPU_BACKENDS:
                d = [x.clone() for x in base]
                with ops.use_backend(b):
                    ops.hutchinson_diag_(d, hz, z, rows, count=2)
                outs[b] = d
            for b in GPU_BACKENDS:
                good = all(torch.allclose(a, c, rtol=1e-5, atol=1e-6) for a, c in zip(outs[b], outs["reference"]))
                print(f"  {'ok  ' if good else 'FAIL'} hutchinson_diag {b} {dtype} per_row={per_row}")
                ok &= good
    return ok


# ----------------------------------------------------------------------------- bench


def ms_of(fn) -> float:
    if DEV.type == "cuda":
        return do_bench(fn, warmup=10, rep=60, return_mode="median")
    import statistics
    import time

    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def masked_step(set_name, dtype, backend, frac, params, grads, rows, nbytes, fused_ms, record) -> None:
    """Times MaskedAdamW.step() (after its first, checked step the kernel is called directly)."""
    try:
        ps = [torch.nn.Parameter(p) for p in params]  # the same storage as params
        for p, g in zip(ps, grads):
            p.grad = g
        opt = MaskedAdamW(ps, lr=1e-5)
        opt.set_rows(dict(zip(ps, rows)))
        with ops.use_backend(backend):
            opt.step()
            ms = ms_of(opt.step)
        record(set_name, dtype, "masked_adamw_step", backend, frac, ms, nbytes, fused_ms)
    except Exception as exc:  # a failure here must not cost the rest of the device run
        print(f"  masked_adamw_step {backend} {frac}: FAILED {type(exc).__name__}: {exc}", flush=True)


def bench(sets: list[str], out_csv: Path) -> None:
    rows_out = []
    copy_src = torch.empty(256 * 1024 * 1024 if DEV.type == "cuda" else 1 << 20, device=DEV)  # 1 GiB on a GPU
    copy_dst = torch.empty_like(copy_src)
    copy_ms = ms_of(lambda: copy_dst.copy_(copy_src))
    copy_gbs = 2 * copy_src.numel() * 4 / copy_ms / 1e6
    del copy_src, copy_dst
    name = torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu (dry run)"
    print(f"device {name}; device-to-device copy {copy_gbs:.0f} GB/s (1 GiB, read+write)")

    def record(set_name, dtype, op, impl, fraction, ms, nbytes, baseline_ms=None):
        gbs = nbytes / ms / 1e6 if nbytes else float("nan")
        r = dict(device=name, set=set_name, dtype=str(dtype).replace("torch.", ""), op=op, impl=impl,
                 fraction=fraction, median_ms=f"{ms:.4f}", gbs=f"{gbs:.0f}", pct_copy=f"{100 * gbs / copy_gbs:.0f}",
                 speedup=f"{baseline_ms / ms:.2f}" if baseline_ms else "")
        rows_out.append(r)
        print(f"  {set_name} {r['dtype']:8s} {op:16s} {impl:18s} {str(fraction):5s} {ms:9.4f} ms {gbs:7.0f} GB/s"
              f" {r['pct_copy']:>4s}% copy" + (f"  x{baseline_ms / ms:.2f}" if baseline_ms else ""), flush=True)

    all_shapes = stored_shapes()
    for set_name in sets:
        for dtype in ((torch.float32, torch.bfloat16) if set_name == "b" else (torch.float32,)):
            shapes = all_shapes[set_name]
            n_params, n_rows = summary(shapes)
            es = torch.finfo(dtype).bits // 8
            gen = torch.Generator(device=DEV).manual_seed(0)
            if DEV.type != "cuda":  # dry run: tiny stand-ins of the same number of tensors
                shapes = [tuple(max(1, d // 64) for d in s) for s in shapes]
                n_params, n_rows = summary(shapes)
            params = [torch.randn(s, device=DEV, generator=gen).to(dtype) * 0.02 for s in shapes]
            grads = [torch.randn(s, device=DEV, generator=gen).to(dtype) for s in shapes]
            print(f"set {set_name} {dtype}: {n_params / 1e6:.1f}M params, {n_rows} rows, {len(shapes)} tensors")
            sal_bytes = n_params * es + n_rows * 4
            eager = ms_of(lambda: [g.abs().flatten(1).mean(1) for g in grads])
            record(set_name, dtype, "row_saliency", "eager_loop", "", eager, sal_bytes)
            for b in ("reference",) + GPU_BACKENDS:
                with ops.use_backend(b):
                    record(set_name, dtype, "row_saliency", b, "", ms_of(lambda: ops.row_saliency(grads)), sal_bytes, eager)
            fused_ms = None
            if dtype == torch.float32:
                for impl, kw in (("adamw_fused", dict(fused=True)), ("adamw_foreach", dict(foreach=True))):
                    ps = [torch.nn.Parameter(p) for p in params]
                    for p, g in zip(ps, grads):
                        p.grad = g
                    opt = torch.optim.AdamW(ps, lr=1e-5, **kw)
                    opt.step()
                    ms = ms_of(opt.step)
                    fused_ms = fused_ms or ms
                    record(set_name, dtype, "adamw_step", impl, 1.0, ms, n_params * (3 * es + 16))
                    del opt, ps
                    torch.cuda.empty_cache()
            for frac in (0.01, 0.05, 0.25, 1.0):
                rows = [random_rows(s[0], frac, device=DEV) for s in shapes]
                n_sel = sum(r.numel() for r in rows)
                sel_elems = sum(r.numel() * (p.numel() // p.shape[0]) for r, p in zip(rows, params))
                ms_state = [torch.zeros(r.numel(), p.numel() // p.shape[0], device=DEV) for r, p in zip(rows, params)]
                vs_state = [torch.zeros_like(m) for m in ms_state]
                steps = [torch.zeros(r.numel(), device=DEV) for r in rows]
                slots = [torch.arange(r.numel(), device=DEV) for r in rows]
                nbytes = sel_elems * (3 * es + 16) + n_sel * (8 + 8 + 8)
                args = (params, grads, ms_state, vs_state, steps, rows, slots)
                for b in ("reference",) + GPU_BACKENDS:
                    with ops.use_backend(b):
                        ms = ms_of(lambda: ops.masked_adamw_(*args, lr=1e-5))
                    record(set_name, dtype, "masked_adamw_op", b, frac, ms, nbytes, fused_ms)
                    if b != "reference":  # the kernel alone: no argument checks, no dispatcher
                        kern = get_backend(b).kernels.get("masked_adamw_")
                        ms = ms_of(lambda: kern(*args, 1e-5, 0.9, 0.999, 1e-8, 0.0, None, None, 0.0))
                        record(set_name, dtype, "masked_adamw_kern", b, frac, ms, nbytes, fused_ms)
                    masked_step(set_name, dtype, b, frac, params, grads, rows, nbytes, fused_ms, record)
                del ms_state, vs_state, steps, slots, args
                torch.cuda.empty_cache()
            diags = [torch.zeros(p.shape, device=DEV) for p in params]
            z = [torch.ones_like(g) for g in grads]
            for b in ("reference",) + GPU_BACKENDS:
                with ops.use_backend(b):
                    ms = ms_of(lambda: ops.hutchinson_diag_(diags, grads, z, None, 1))
                record(set_name, dtype, "hutchinson_diag", b, 1.0, ms, n_params * (2 * es + 8))
            del params, grads, diags, z
            torch.cuda.empty_cache()
    write_csv_atomic(rows_out, str(out_csv))
    print(f"wrote {out_csv}")
    # which GPU backend is faster, op by op (geometric mean of time ratios cuda / triton)
    import math

    for op in ("row_saliency", "masked_adamw_op", "hutchinson_diag"):
        ratios = []
        keyed = {(r["set"], r["dtype"], r["fraction"], r["impl"]): float(r["median_ms"]) for r in rows_out if r["op"] == op}
        for (s, d, f, impl), t in keyed.items():
            if impl == GPU_BACKENDS[0] and (s, d, f, "triton") in keyed:
                ratios.append(t / keyed[(s, d, f, "triton")])
        if ratios:
            g = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
            print(f"{op}: time {GPU_BACKENDS[0]} / triton, geometric mean over {len(ratios)} cases = {g:.2f} "
                  f"({GPU_BACKENDS[0] if g < 1 else 'triton'} faster)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--sets", nargs="+", default=["a", "b", "c"])
    ap.add_argument("--out", type=Path, default=Path("gpu_bench.csv"))
    ap.add_argument("--device", default="cuda", help="cpu: dry run of this script with the cpp/triton backends")
    ap.add_argument("--backends", nargs="+", help="backends to compare with the reference (default: cuda triton)")
    args = ap.parse_args()
    global DEV, GPU_BACKENDS
    DEV = torch.device(args.device)
    if DEV.type == "cpu":
        GPU_BACKENDS = ("cpp", "triton")
    if args.backends:
        GPU_BACKENDS = tuple(args.backends)
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, "
          f"backends on {DEV.type}: {ops.available_backends(DEV.type)}")
    ok = True
    if args.check:
        ok = check()
        print("CHECK", "PASSED" if ok else "FAILED")
    if args.bench:
        bench(args.sets, args.out)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
