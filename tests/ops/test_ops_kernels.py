"""Every backend of every op against the pure-torch reference / a float64 oracle.

Backends run on the CPU (reference, cpp, triton under TRITON_INTERPRET=1) and,
when a GPU is present, on CUDA (reference, cuda, triton).  Shapes are awkward
on purpose: one row, odd widths, 1-D, 4-D conv weights.  Low-precision results
pass flash-attention's rule: error vs float64 at most twice plain torch's.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton kernels are first imported

import pytest

import trust_fast.ops as ops

SHAPES = [(1, 1), (7, 13), (3, 5, 3, 3), (17,), (2, 1000), (33, 65)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CPU_BACKENDS = ["reference", "cpp", "triton"]
CUDA_BACKENDS = ["reference", "cuda", "triton"]


def _cases() -> list:
    cases = [pytest.param((b, "cpu"), id=f"{b}-cpu") for b in CPU_BACKENDS]
    for b in CUDA_BACKENDS:
        cases.append(
            pytest.param(
                (b, "cuda"), id=f"{b}-cuda",
                marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
            )
        )
    return cases


@pytest.fixture(params=_cases())
def backend(request):
    name, device = request.param
    if name == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU tensors runs only under TRITON_INTERPRET=1 (this run has a GPU)")
    reason = ops.registry.get_backend(name).unavailable_reason(torch.device(device).type)
    assert reason is None, f"backend {name} should be available on {device}: {reason}"
    with ops.use_backend(name):
        yield name, torch.device(device)


def _randn(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def assert_flash_rule(out: torch.Tensor, oracle: torch.Tensor, plain: torch.Tensor, what: str) -> None:
    """|out - oracle| <= 2 * |plain - oracle| (max over elements) + float32 noise."""
    oracle = oracle.double().cpu()
    err = (out.double().cpu() - oracle).abs().max().item() if out.numel() else 0.0
    base = (plain.double().cpu() - oracle).abs().max().item() if out.numel() else 0.0
    floor = 8 * torch.finfo(torch.float32).eps * max(1.0, oracle.abs().max().item() if oracle.numel() else 1.0)
    assert err <= 2 * base + floor, f"{what}: error {err:.3g} vs plain torch {base:.3g}"


# ----------------------------------------------------------------------------- row_saliency


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_saliency(backend, dtype):
    name, device = backend
    gen = torch.Generator().manual_seed(1)
    gs = [_randn(s, dtype, device, gen) for s in SHAPES]
    ws = [_randn(s, dtype, device, gen) for s in SHAPES]
    for mode in ("g", "gw"):
        out = ops.row_saliency(gs, ws if mode == "gw" else None, mode)
        assert out.dtype == torch.float32 and out.device.type == device.type
        assert out.shape == (sum(s[0] for s in SHAPES),)
        oracle = torch.cat(
            [((g.double() * w.double()) if mode == "gw" else g.double()).abs().reshape(g.shape[0], -1).mean(1)
             for g, w in zip(gs, ws)]
        )
        plain = torch.cat(
            [((g * w) if mode == "gw" else g).abs().flatten(1).mean(1) if g.dim() > 1 else (g * w if mode == "gw" else g).abs()
             for g, w in zip(gs, ws)]
        )
        assert_flash_rule(out, oracle, plain, f"{name} {dtype} {mode}")


def test_row_saliency_empty_list_and_zero_rows(backend):
    _, device = backend
    assert ops.row_saliency([]).numel() == 0
    out = ops.row_saliency([torch.ones(0, 4, device=device), torch.full((2, 3), -2.0, device=device)])
    assert out.tolist() == [2.0, 2.0]


# ----------------------------------------------------------------------------- masked_adamw_


def _adamw_oracle(p, g, m, v, step, rows, slots, hp, h=None, p0=None, lam=0.0):
    """torch.optim.AdamW's math on the given rows, in float64 (returns new p, m, v, step)."""
    p, m, v, step = p.double().clone(), m.double().clone(), v.double().clone(), step.double().clone()
    R = p.shape[0]
    p2 = p.view(R, -1)
    r, s = rows.long().cpu(), slots.long().cpu()
    if r.numel() == 0:
        return p, m, v, step
    x = p2[r]
    gr = g.double().reshape(R, -1)[r]
    if h is not None:
        hr = h.double().reshape(R, -1)[r].clamp(min=0)  # negative curvature: no penalty
        gr = gr + lam * hr * (x - p0.double().reshape(R, -1)[r])
    t = step[s] + 1
    step[s] = t
    m[s] = m[s] * hp["beta1"] + (1 - hp["beta1"]) * gr
    v[s] = v[s] * hp["beta2"] + (1 - hp["beta2"]) * gr * gr
    bc1 = (1 - hp["beta1"] ** t).unsqueeze(1)
    bc2 = (1 - hp["beta2"] ** t).unsqueeze(1)
    x = x * (1 - hp["lr"] * hp["weight_decay"])
    x = x - hp["lr"] / bc1 * m[s] / (v[s].sqrt() / bc2.sqrt() + hp["eps"])
    p2[r] = x
    return p, m, v, step


def _adam_problem(device, dtype, gen, penalty: str, index_dtypes=(torch.int64, torch.int32)):
    params, grads, ms, vs, steps, rows, slots, hs, p0s = [], [], [], [], [], [], [], [], []
    for i, shape in enumerate(SHAPES):
        R = shape[0]
        C = 1
        for d in shape[1:]:
            C *= d
        params.append(_randn(shape, dtype, device, gen))
        grads.append(_randn(shape, dtype, device, gen))
        S = R + 2  # some slots unused: they must stay untouched
        ms.append((torch.rand(S, C, generator=gen) * 0.1).to(device))
        vs.append((torch.rand(S, C, generator=gen) * 0.01).to(device))
        steps.append(torch.randint(0, 5, (S,), generator=gen).float().to(device))
        # row sets: all rows, none, one, a random half
        kind = i % 4
        if kind == 0:
            r = torch.arange(R)
        elif kind == 1:
            r = torch.zeros(0, dtype=torch.int64)
        elif kind == 2:
            r = torch.tensor([R - 1])
        else:
            r = torch.randperm(R, generator=gen)[: max(1, R // 2)]
        s = torch.randperm(S, generator=gen)[: r.numel()]
        idt = index_dtypes[i % len(index_dtypes)]
        rows.append(r.to(device=device, dtype=idt))
        slots.append(s.to(device=device, dtype=idt))
        if penalty == "per_element":
            hs.append((torch.rand(shape, generator=gen) - 0.3).to(device))  # some negative: clamped at 0
        elif penalty == "per_row":
            hs.append((torch.rand(R, generator=gen) - 0.3).to(device))
        p0s.append(_randn(shape, dtype, device, gen))
    if penalty == "none":
        hs, p0s = None, None
    return params, grads, ms, vs, steps, rows, slots, hs, p0s


@pytest.mark.parametrize("penalty", ["per_row", "per_element"])
def test_negative_curvature_adds_no_penalty(backend, penalty):
    """max(h, 0): where the Hessian-diagonal estimate is negative the step is exactly the one
    without a penalty (a negative penalty would push the weights away from the reference)."""
    name, device = backend
    problem = _adam_problem(device, torch.float32, torch.Generator().manual_seed(5), penalty)
    params, grads, ms, vs, steps, rows, slots, hs, p0s = problem
    hs = [-(h.abs() + 0.1) for h in hs]
    hp = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    plain = [[x.clone() for x in xs] for xs in (params, ms, vs, steps)]
    ops.masked_adamw_(params, grads, ms, vs, steps, rows, slots, **hp, hess=hs, ref_params=p0s, lam=0.7)
    ops.masked_adamw_(plain[0], grads, plain[1], plain[2], plain[3], rows, slots, **hp)
    for got, want in zip(params + ms + vs, plain[0] + plain[1] + plain[2]):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{name} {penalty}")


@pytest.mark.parametrize("penalty", ["none", "per_row", "per_element"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_adamw(backend, dtype, penalty):
    name, device = backend
    gen = torch.Generator().manual_seed(2)
    params, grads, ms, vs, steps, rows, slots, hs, p0s = _adam_problem(device, dtype, gen, penalty)
    hp = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    lam = 0.7 if hs is not None else 0.0
    before = [x.clone() for x in params + ms + vs + steps]
    ref = [[x.clone() for x in xs] for xs in (params, ms, vs, steps)]
    ops.masked_adamw_(params, grads, ms, vs, steps, rows, slots, **hp, hess=hs, ref_params=p0s, lam=lam)
    with ops.use_backend("reference"):
        ops.masked_adamw_(ref[0], grads, ref[1], ref[2], ref[3], rows, slots, **hp, hess=hs, ref_params=p0s, lam=lam)
    n = len(params)
    for i in range(n):
        o = _adamw_oracle(before[i], grads[i], before[n + i], before[2 * n + i], before[3 * n + i], rows[i], slots[i],
                          hp, None if hs is None else hs[i], None if p0s is None else p0s[i], lam)
        for k, (got, plain, want) in enumerate(zip((params[i], ms[i], vs[i], steps[i]), (r[i] for r in ref), o)):
            assert_flash_rule(got, want, plain, f"{name} {dtype} {penalty} tensor {i} output {k}")
        # rows and slots not listed: bit for bit unchanged
        R = params[i].shape[0]
        untouched = torch.ones(R, dtype=torch.bool)
        untouched[rows[i].long().cpu()] = False
        assert torch.equal(params[i].view(R, -1)[untouched.to(device)], before[i].view(R, -1)[untouched.to(device)])
        free = torch.ones(ms[i].shape[0], dtype=torch.bool)
        free[slots[i].long().cpu()] = False
        free = free.to(device)
        for got, old in ((ms[i], before[n + i]), (vs[i], before[2 * n + i]), (steps[i], before[3 * n + i])):
            assert torch.equal(got[free], old[free])


# ----------------------------------------------------------------------------- hutchinson_diag_


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hutchinson_diag(backend, dtype):
    name, device = backend
    gen = torch.Generator().manual_seed(3)
    hz = [_randn(s, dtype, device, gen) for s in SHAPES]
    z = [(torch.randint(0, 2, s, generator=gen) * 2 - 1).to(device=device, dtype=dtype) for s in SHAPES]
    for per_row in (False, True):
        for with_rows in (False, True):
            diags = [torch.rand(s[0] if per_row else s, generator=gen).to(device) for s in SHAPES]
            rows = None
            if with_rows:
                rows = [torch.randperm(s[0], generator=gen)[: (s[0] + 1) // 2].to(device) for s in SHAPES]
                rows[1] = rows[1].int()
            before = [d.clone() for d in diags]
            plain = [d.clone() for d in diags]
            ops.hutchinson_diag_(diags, hz, z, rows, count=3)
            with ops.use_backend("reference"):
                ops.hutchinson_diag_(plain, hz, z, rows, count=3)
            for i, d in enumerate(diags):
                est = (z[i].double() * hz[i].double()).reshape(SHAPES[i][0], -1)
                if per_row:
                    est = est.mean(1)
                want = before[i].double().reshape(est.shape).clone()
                sel = rows[i].long().cpu() if rows is not None else torch.arange(SHAPES[i][0])
                sel = sel.to(device)
                want[sel] = want[sel] * 0.75 + est[sel] / 4
                assert_flash_rule(d.reshape(est.shape), want, plain[i].reshape(est.shape),
                                  f"{name} {dtype} per_row={per_row} rows={with_rows} tensor {i}")


@pytest.mark.parametrize("penalty", ["per_row", "per_element"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_adamw_reads_a_bfloat16_hessian_diagonal(backend, dtype, penalty):
    """hess stored in bfloat16 (TrustConfig.hessian_dtype): every backend steps as if it held the
    same values in float32 (the penalty's math is float32 either way)."""
    name, device = backend
    params, grads, ms, vs, steps, rows, slots, hs, p0s = _adam_problem(device, dtype, torch.Generator().manual_seed(7),
                                                                       penalty)
    hs16 = [h.to(torch.bfloat16) for h in hs]
    hp = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    same = [[x.clone() for x in xs] for xs in (params, ms, vs, steps)]
    ops.masked_adamw_(params, grads, ms, vs, steps, rows, slots, **hp, hess=hs16, ref_params=p0s, lam=0.7)
    ops.masked_adamw_(same[0], grads, same[1], same[2], same[3], rows, slots, **hp,
                      hess=[h.float() for h in hs16], ref_params=p0s, lam=0.7)
    # the same values, up to the compiler's instruction choice in another template instantiation (FMA contraction)
    for got, want in zip(params + ms + vs + steps, same[0] + same[1] + same[2] + same[3]):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7, msg=f"{name} {dtype} {penalty}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_hutchinson_diag_in_bfloat16(backend, dtype):
    """A bfloat16 running mean: float32 math, one rounding per store, so it is the float32 result
    rounded (within one bfloat16 step), per element and per row, on all or listed rows."""
    name, device = backend
    gen = torch.Generator().manual_seed(8)
    hz = [_randn(s, dtype, device, gen) for s in SHAPES]
    z = [(torch.randint(0, 2, s, generator=gen) * 2 - 1).to(device=device, dtype=dtype) for s in SHAPES]
    for per_row in (False, True):
        for rows in (None, [torch.randperm(s[0], generator=gen)[: (s[0] + 1) // 2].to(device) for s in SHAPES]):
            start = [torch.rand(s[0] if per_row else s, generator=gen).to(device) for s in SHAPES]
            d16 = [d.to(torch.bfloat16) for d in start]
            d32 = [d.float() for d in d16]
            for count in (0, 3):
                ops.hutchinson_diag_(d16, hz, z, rows, count=count)
                ops.hutchinson_diag_(d32, hz, z, rows, count=count)
                for i, (a, b) in enumerate(zip(d16, d32)):
                    assert a.dtype == torch.bfloat16
                    # one rounding of the float32 result, from the same (bfloat16) start: to nearest (half a
                    # step, 2**-8 relative), except Triton's CPU interpreter, which truncates (a whole step)
                    tol = 2 ** -7 if name == "triton" and device.type == "cpu" else 2 ** -8
                    torch.testing.assert_close(a.float(), b, rtol=tol, atol=1e-30,
                                               msg=f"{name} {dtype} per_row={per_row} count={count} tensor {i}")
                d32 = [d.float() for d in d16]  # continue both from the stored bfloat16 values


def test_hutchinson_first_sample_overwrites_and_mean_converges(backend):
    """count=0 replaces the estimate; over many probes the mean approaches diag(H)."""
    _, device = backend
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(6, 6, generator=gen)
    hess = (a @ a.T).to(device)  # symmetric matrix acting on a (6, 1) "parameter"
    diag = torch.full((6, 1), 123.0, device=device)
    for k in range(160):
        zk = (torch.randint(0, 2, (6, 1), generator=gen) * 2 - 1).float().to(device)
        ops.hutchinson_diag_([diag], [hess @ zk], [zk], count=k)
        if k == 0:
            assert torch.equal(diag, zk * (hess @ zk))
    rel = ((diag.squeeze(1) - hess.diagonal()).abs() / hess.diagonal().abs().mean()).max().item()
    assert rel < 0.35, rel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_hutchinson_first_sample_overwrites_non_finite_diags(backend, dtype):
    """count=0 overwrites: a NaN/Inf start (an uninitialised buffer) must not survive as NaN * 0.

    hz holds small integers and the row widths are powers of two, so z*hz and its row
    mean are exact in every dtype and accumulation order: each backend must give them
    bit for bit.  Rows not given keep their (non-finite) values bit for bit."""
    name, device = backend
    gen = torch.Generator().manual_seed(6)
    shapes = [(5, 4), (3, 2, 2, 2), (6,), (2, 64)]
    hz = [torch.randint(-8, 9, s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    z = [(torch.randint(0, 2, s, generator=gen) * 2 - 1).to(device=device, dtype=dtype) for s in shapes]
    junk = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for per_row in (False, True):
        for with_rows in (False, True):
            diags = [junk[torch.arange(s[0] if per_row else math.prod(s)) % 3].reshape(s[0] if per_row else s)
                     .to(device) for s in shapes]
            before = [d.clone() for d in diags]
            rows = [torch.tensor([0, s[0] - 1]).unique().to(device) for s in shapes] if with_rows else None
            ops.hutchinson_diag_(diags, hz, z, rows, count=0)
            for i, (d, s) in enumerate(zip(diags, shapes)):
                est = (z[i].double() * hz[i].double()).reshape(s[0], -1)
                est = (est.mean(1) if per_row else est).float().cpu()
                sel = rows[i].cpu() if with_rows else torch.arange(s[0])
                want = before[i].cpu().reshape(est.shape).clone()
                want[sel] = est[sel]
                got = d.cpu().reshape(est.shape)
                assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (
                    f"{name} {dtype} per_row={per_row} rows={with_rows} tensor {i}: {got} != {want}")
