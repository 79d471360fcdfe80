"""The step API inside a user's own stack: accelerate-wrapped optimizers and gradient
accumulation over micro-batches (TrustUnlearner.accumulate)."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import small
from trust_fast import TrustConfig, TrustUnlearner
from trust_fast.engine import regularizer as engine_mod
from trust_fast import hessian as hessian_mod
from trust_fast.concepts import parse_concept, user_prompts

SMALL = small(batch=2)


def unlearner(pipe, **kw):
    spec = parse_concept("red", world=False)
    prompts = user_prompts(spec, ["a red circle", "a red square", "red car"], ["a blue square", "a green circle"])
    u = TrustUnlearner(copy.deepcopy(pipe), spec, TrustConfig(**{**SMALL, **kw}), prompts=prompts)
    u.prepare()
    return u


def batches(u, n: int, seed: int):
    """n micro-batches (noisy, t, cond, anchor) of forget and retain, fixed by `seed`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(2, 4, 8, 8, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        out.append((x, t, u.emb_forget[:2], u.emb_anchor[:2], u.emb_retain[:2]))
    return out


@pytest.mark.parametrize("hessian", ["none", "hvp"])
def test_accumulated_micro_batches_step_like_the_mean_loss(tiny_sd, hessian):
    """accumulate(b1); update(b2) == update(mean of b1, b2): the same rows and the same weights
    (gradients and Hessian-vector products are linear in the loss)."""
    a, b = unlearner(tiny_sd, hessian=hessian), unlearner(tiny_sd, hessian=hessian)
    for step in range(2):  # the second step has Delta != 0, so the hvp term is non-zero
        mb = batches(a, 2, seed=step)
        for i, (x, t, c, anc, r) in enumerate(mb):
            lf, lr = a.forget_loss(x, t, c, anc), a.retain_loss(x, t, r)
            if i < len(mb) - 1:
                a.accumulate(lf, lr)
            else:
                sa = a.update(lf, lr)
        lf = sum(b.forget_loss(x, t, c, anc) for x, t, c, anc, _ in mb) / len(mb)
        lr = sum(b.retain_loss(x, t, r) for x, t, _, _, r in mb) / len(mb)
        sb = b.update(lf, lr)
        assert sa["selected_rows"] == sb["selected_rows"] > 0
        assert all(torch.equal(ra, rb) for ra, rb in zip(a.selected_rows, b.selected_rows))
        assert sa["loss_forget"] == pytest.approx(sb["loss_forget"], rel=1e-6)
    for pa, pb in zip(a.params, b.params):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(p, p0) for p, p0 in zip(a.params, a.theta0))


def test_accumulation_under_the_diag_hessian_folds_every_micro_batch_probe(tiny_sd):
    u = unlearner(tiny_sd, hessian="diag", diag_samples=1, diag_interval=1)
    mb = batches(u, 3, seed=0)
    for x, t, c, anc, r in mb[:-1]:
        u.accumulate(u.forget_loss(x, t, c, anc), u.retain_loss(x, t, r))
    x, t, c, anc, r = mb[-1]
    s = u.update(u.forget_loss(x, t, c, anc), u.retain_loss(x, t, r))
    assert not s["skipped"] and u.hutchinson.count == 3 and u.step_count == 1


def test_a_non_finite_micro_batch_skips_the_accumulated_step_and_its_probes(tiny_sd):
    u = unlearner(tiny_sd, hessian="diag", diag_samples=1, diag_interval=1)
    before = [p.detach().clone() for p in u.params]
    (x, t, c, anc, r), (x2, t2, *_) = batches(u, 2, seed=1)
    u.accumulate(u.forget_loss(x, t, c, anc) * float("nan"), u.retain_loss(x, t, r))
    s = u.update(u.forget_loss(x2, t2, c, anc), u.retain_loss(x2, t2, r))
    assert s["skipped"] and u.hutchinson.count == 0
    assert all(torch.equal(p, q) for p, q in zip(before, u.params))


def test_accelerate_prepared_optimizer_works_with_update(tiny_sd):
    accelerate = pytest.importorskip("accelerate")  # a test extra: installed in CI
    u, ref = unlearner(tiny_sd), unlearner(tiny_sd)
    _, u.optimizer = accelerate.Accelerator(cpu=True).prepare(u.unet, u.optimizer)
    assert type(u.optimizer).__name__ == "AcceleratedOptimizer"
    for _ in range(2):
        s, sr = u.step(), ref.step()
        assert s["selected_rows"] == sr["selected_rows"] > 0
    for p, q in zip(u.params, ref.params):
        assert torch.equal(p, q)
    assert u.finalize()["rows_reset"] >= 0


# ----------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_trains_float32_masters_and_writes_their_rows(tiny_sd, dtype):
    """A half-precision model steps float32 master weights: the model's target rows are the masters
    rounded, rows never selected keep their original bits, and an update far below the
    half-precision step still accumulates in the master."""
    u = unlearner(copy.deepcopy(tiny_sd).to(dtype), lr=1e-5)
    assert u.master is not None and all(q.dtype == torch.float32 for q in u.master)
    assert (u.loss_scale is not None) == (dtype == torch.float16)
    original = [p.detach().clone() for p in u.params]
    for _ in range(3):
        s = u.step()
        assert not s["skipped"]
    for t, (rows, _) in zip(u.targets, (u.masked_optimizer.row_updates(dict(zip(map(id, u.params), u.opt_params))[id(t.weight)]) for t in u.targets)):
        for p in t.params:
            q = dict(zip(map(id, u.params), u.opt_params))[id(p)]
            i = next(k for k, x in enumerate(u.params) if x is p)
            assert torch.equal(p.detach(), q.to(dtype)), t.name      # model == rounded master
            untouched = torch.ones(p.shape[0], dtype=torch.bool)
            untouched[rows] = False
            assert torch.equal(p.detach()[untouched], original[i][untouched])
    moved = sum(int((q != p0.float()).any(-1).sum()) for q, p0 in zip(u.master, original) if q.dim() == 2)
    assert moved > 0  # lr 1e-5 moves the masters, though many such steps round away in the model


def test_float16_overflow_halves_the_loss_scale_and_skips_the_step(tiny_sd):
    u = unlearner(copy.deepcopy(tiny_sd).to(torch.float16))
    u.loss_scale = 2.0 ** 40  # any gradient overflows float16 at this scale
    before = [p.detach().clone() for p in u.params]
    s = u.step()
    assert s["skipped"] and u.loss_scale == 2.0 ** 39
    assert all(torch.equal(a, p) for a, p in zip(before, u.params))
    u.loss_scale = 2.0 ** 10
    assert not u.step()["skipped"] and u.precision.good_steps == 1


def test_float16_runs_resume_bit_identically(tiny_sd, tmp_path):
    from trust_fast.checkpoint import load_checkpoint, save_checkpoint

    half = copy.deepcopy(tiny_sd).to(torch.float16)
    a = unlearner(half)
    for _ in range(2):
        a.step()
    save_checkpoint(a, str(tmp_path / "ck"))
    a.step()
    b = unlearner(half)
    load_checkpoint(b, str(tmp_path / "ck"))
    b.step()
    assert b.loss_scale == a.loss_scale
    assert all(torch.equal(p, q) for p, q in zip(a.params, b.params))
    assert all(torch.equal(p, q) for p, q in zip(a.master, b.master))


# ----------------------------------------------------------------------------- autocast (TrustConfig.amp)


def test_amp_resolves_to_autocast_only_for_float32_models():
    from trust_fast.engine import amp_dtype

    cpu, f32 = torch.device("cpu"), torch.float32
    assert amp_dtype("off", cpu, f32) is None
    assert amp_dtype("auto", cpu, f32) is None  # auto: bf16 on CUDA only; CPU runs keep their float32 numbers
    assert amp_dtype("bf16", cpu, f32) is torch.bfloat16 and amp_dtype("fp16", cpu, f32) is torch.float16
    assert amp_dtype("auto", cpu, torch.float16) is None and amp_dtype("off", cpu, torch.bfloat16) is None
    with pytest.raises(ValueError, match="float32 model"):
        amp_dtype("bf16", cpu, torch.float16)
    with pytest.raises(ValueError, match="amp must be one of"):
        TrustConfig(amp="half").validate()


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_runs_every_denoiser_pass_in_half_precision_and_steps_float32_weights(tiny_sd, amp):
    """Under amp the UNet's linear layers compute in half precision on every pass (frozen targets,
    forget and retain losses, the Hessian steps), predictions come back in float32, the float32
    target weights are stepped directly (no masters) and fp16 scales its losses; the steps move
    only selected rows, like a float32 run."""
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    u = unlearner(tiny_sd, amp=amp, hessian="diag", diag_interval=1)
    seen = set()
    hooks = [m.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
             for m in u.unet.modules() if isinstance(m, torch.nn.Linear)]
    assert u.amp_dtype is half and u.master is None
    assert (u.loss_scale is not None) == (amp == "fp16")
    x, t, c, anc, r = batches(u, 1, seed=0)[0]
    assert u.pred(x, t, c).dtype == torch.float32 and u.frozen_pred(x, t, c).dtype == torch.float32
    for _ in range(2):
        old = {id(p): p.detach().clone() for p in u.params}
        s = u.step()
        assert not s["skipped"] and s["selected_rows"] > 0
        for tgt, rows in zip(u.targets, u.selected_rows):
            moved = (tgt.weight.detach() != old[id(tgt.weight)]).any(dim=1).nonzero().flatten()
            assert set(moved.tolist()) <= set(rows.tolist()), tgt.name
    for h in hooks:
        h.remove()
    assert seen == {half}
    assert all(p.dtype == torch.float32 for p in u.params)
    assert u.hutchinson.count == 2 and all(torch.isfinite(d).all() for d in u.hutchinson.diags)


def test_amp_bf16_step_follows_the_float32_step(tiny_sd):
    """The bf16 step is the float32 step in lower precision: same losses to bf16's resolution and
    mostly the same rows selected (the z-score threshold makes a few borderline rows flip)."""
    a, b = unlearner(tiny_sd, hessian="none"), unlearner(tiny_sd, hessian="none", amp="bf16")
    sa, sb = a.step(), b.step()
    assert sb["loss_forget"] == pytest.approx(sa["loss_forget"], rel=0.05)
    assert sb["loss_retain"] == pytest.approx(sa["loss_retain"], rel=0.1, abs=1e-4)
    ra = {(i, r) for i, rows in enumerate(a.selected_rows) for r in rows.tolist()}
    rb = {(i, r) for i, rows in enumerate(b.selected_rows) for r in rows.tolist()}
    assert len(ra & rb) >= 0.8 * max(len(ra), len(rb)), (len(ra), len(rb), len(ra & rb))


# ----------------------------------------------------------------------------- the denoiser switches


def _rows(u):
    return [r.tolist() for r in u.selected_rows]


def _adam_close(a, b, steps: int) -> None:
    """Two runs' weights agree to float32 rounding, as far as Adam lets them: it divides by
    sqrt(v), so an element whose gradient is at rounding level moves by an arbitrary fraction of
    lr, not by rounding. So: all but 0.1% of the elements agree to rounding, and none differs by
    more than lr per step."""
    lr = a.config.lr
    for p, q in zip(a.params, b.params):
        p, q = p.detach(), q.detach()
        off = ~torch.isclose(p, q, rtol=1e-4, atol=1e-6)
        assert float(off.float().mean()) <= 1e-3, f"{int(off.sum())} of {p.numel()} elements differ"
        assert float((p - q).abs().max()) <= lr * steps


def test_channels_last_and_gradient_checkpointing_step_like_the_default(tiny_sd):
    """Memory format and activation recomputation change how the step runs, not what it computes:
    the same rows and (to float32 rounding) the same weights, Hessian steps included."""
    ref = unlearner(tiny_sd, hessian="diag", diag_interval=2)
    fast = unlearner(tiny_sd, hessian="diag", diag_interval=2, channels_last=True, grad_checkpointing=True)
    assert fast.unet.is_gradient_checkpointing
    conv = next(m for m in fast.unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        a, b = ref.step(), fast.step()
        assert _rows(ref) == _rows(fast) and a["selected_rows"] > 0
        assert b["loss_forget"] == pytest.approx(a["loss_forget"], rel=1e-4)
    _adam_close(ref, fast, steps=3)


@pytest.mark.parametrize("hessian", ["diag", "hvp"])
def test_hessian_micro_batches_give_the_whole_batch_step(tiny_sd, hessian):
    """Steps that differentiate the retain loss twice run its batch a micro-batch at a time (3
    images as 2 + 1): the same retain loss, rows, Hessian estimate and weights as one pass over the
    whole batch, to float32 summation order; other steps run the batch in one pass."""
    # the estimate in float32: this pins the micro-batching, at float32 summation order (a bfloat16
    # estimate, the default, rounds the same sum differently by a step; its ops are pinned in test_ops_kernels)
    kw = dict(hessian=hessian, diag_interval=2, hvp_interval=1, retain_batch_size=3, hessian_dtype="float32")
    whole, parts = unlearner(tiny_sd, hessian_micro_batch=0, **kw), unlearner(tiny_sd, hessian_micro_batch=2, **kw)
    sizes = []
    real = parts.retain_loss

    def counted(noisy, *a, **k):
        sizes[-1].append(noisy.shape[0])
        return real(noisy, *a, **k)

    parts.retain_loss = counted
    for _ in range(3):
        sizes.append([])
        a, b = whole.step(), parts.step()
        assert _rows(whole) == _rows(parts) and a["selected_rows"] > 0
        assert b["loss_retain"] == pytest.approx(a["loss_retain"], rel=1e-4)
    twice = [s % 2 == 0 for s in range(3)] if hessian == "diag" else [s > 0 for s in range(3)]
    assert sizes == [[2, 1] if t else [3] for t in twice]
    if hessian == "diag":
        for d, e in zip(whole.hutchinson.diags, parts.hutchinson.diags):
            # H z sums many terms of both signs: compare on the estimate's own scale
            torch.testing.assert_close(d, e, rtol=1e-4, atol=1e-4 * float(d.abs().max()))
        assert whole.hutchinson.count == parts.hutchinson.count == 2
    _adam_close(whole, parts, steps=3)


@pytest.mark.parametrize("hessian", ["diag", "hvp"])
def test_amp_hessian_steps_on_half_leaves_give_the_float32_leaf_step(tiny_sd, hessian):
    """Under amp, Hessian steps differentiate w.r.t. bf16 leaf copies of the Linear targets (what
    autocast casts them to anyway): the gradient and H z come out in bf16, half the memory, and the
    step is the one differentiated w.r.t. the float32 params: same rows, losses, Hessian estimate and
    weights."""
    kw = dict(hessian=hessian, diag_interval=2, hvp_interval=1, amp="bf16")
    ref, half = unlearner(tiny_sd, **kw), unlearner(tiny_sd, **kw)
    ref.precision.half_hessian = False
    seen = []
    real = hessian_mod.grad_and_hvps

    def spy(loss, params, vectors, keep=None):
        seen.append({p.dtype for p in params})
        out = real(loss, params, vectors, keep)
        seen[-1] |= {h.dtype for hv in out[1] for h in hv}
        return out

    hessian_mod.grad_and_hvps = spy
    engine_mod.grad_and_hvps = spy
    try:
        for _ in range(3):
            seen.append("step")
            a, b = ref.step(), half.step()
            assert _rows(ref) == _rows(half) and a["selected_rows"] > 0
            assert b["loss_retain"] == a["loss_retain"] and b["loss_forget"] == a["loss_forget"]
    finally:
        hessian_mod.grad_and_hvps = engine_mod.grad_and_hvps = real
    # each Hessian step: the float32 run's products in float32, the half run's in bf16
    dtypes = [d for d in seen if d != "step"]
    assert dtypes == [{torch.float32}, {torch.bfloat16}] * 2, seen  # steps 0 and 2 (diag), 1 and 2 (hvp)
    assert half.precision.leaves is None and all(p.dtype == torch.float32 and p.grad is None for p in half.params)
    if hessian == "diag":
        for d, e in zip(ref.hutchinson.diags, half.hutchinson.diags):
            torch.testing.assert_close(e, d, rtol=1e-5, atol=1e-6 * float(d.abs().max()))
    _adam_close(ref, half, steps=3)


def test_hessian_micro_batch_must_be_a_count():
    with pytest.raises(ValueError, match="hessian_micro_batch must be an int >= 0"):
        TrustConfig(hessian_micro_batch=-1).validate()


def test_grad_checkpointing_is_refused_for_a_denoiser_without_it(tiny_sd):
    bare = copy.deepcopy(tiny_sd)
    bare.unet.enable_gradient_checkpointing = None  # a denoiser without diffusers' switch
    with pytest.raises(ValueError, match="enable_gradient_checkpointing"):
        unlearner(bare, grad_checkpointing=True)


@pytest.mark.slow
def test_compiled_denoiser_steps_like_eager_and_does_not_recompile_as_rows_change(tiny_sd):
    """compile_unet with a backend that runs the captured graphs eagerly (the compiler itself is
    torch's business): the steps match the eager ones, and once the three kinds of pass are
    compiled (the edited model, the frozen one, the Hessian step's double backward) new rows and
    new weights compile nothing more."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ref = unlearner(tiny_sd, hessian="diag", diag_interval=2)
    comp = unlearner(tiny_sd, hessian="diag", diag_interval=2, compile_unet="aot_eager")
    assert comp.denoiser.forward is not comp.unet
    compiled_after = []
    for _ in range(5):
        a, b = ref.step(), comp.step()
        assert _rows(ref) == _rows(comp) and a["selected_rows"] > 0
        assert b["loss_forget"] == pytest.approx(a["loss_forget"], rel=1e-4)
        compiled_after.append(counters["stats"]["unique_graphs"])
    assert compiled_after[2] > 0 and compiled_after[-1] == compiled_after[2], compiled_after
    for p, q in zip(ref.params, comp.params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", [True, "inductor"])
def test_compile_unet_refuses_inductor(backend):
    """inductor's compiled denoiser gave wrong weight gradients through the engine's passes (a tiny
    SD UNet: the same loss, zero gradients for the mid block): refused in one line until fixed."""
    with pytest.raises(ValueError, match="compile_unet='inductor' is refused: .* aot_eager, eager"):
        TrustConfig(compile_unet=backend).validate()
