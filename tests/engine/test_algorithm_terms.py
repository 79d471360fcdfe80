"""Each term of the unlearning update, checked against an expectation derived without the engine.

Objectives: noising and regression targets by hand on constructed tensors. Engine targets: the
anchor and ESD targets against the ORIGINAL UNet called directly (a deep copy taken before any
step). Update terms, on a batch the test provides, two copies of one unlearner that differ in one
weight only: the retain term adds exactly alpha * grad L_retain (autograd on an independent
distillation loss), the hvp term exactly lam * H_r Delta (float64 central finite differences of
that gradient), the diag term exactly (1 - beta1) * lam * h * Delta to the selected rows' first
moments. SalUn's mask is the top half of the summed forget-data gradient, recomputed here.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_config
from trust_fast import TrustUnlearner, objectives
from trust_fast.engine import encode_prompts
from trust_fast.localize import static_mask


# ------------------------------------------------------------------------------------- objectives

def test_add_noise_and_the_three_targets_by_hand():
    abar = torch.tensor([0.0, 0.64, 0.36, 1.0])  # sqrt: 0.8 / 0.6 at t=1, 0.6 / 0.8 at t=2
    x0, noise = torch.full((2, 1, 1, 1), 2.0), torch.full((2, 1, 1, 1), -1.0)
    t = torch.tensor([1, 2])
    xt = objectives.add_noise(x0, noise, t, abar)
    assert xt.flatten().tolist() == pytest.approx([0.8 * 2 + 0.6 * -1, 0.6 * 2 + 0.8 * -1])
    eps = objectives.diffusion_target(x0, noise, t, abar, "epsilon")
    v = objectives.diffusion_target(x0, noise, t, abar, "v_prediction")
    x = objectives.diffusion_target(x0, noise, t, abar, "sample")
    assert torch.equal(eps, noise) and torch.equal(x, x0)
    # v = sqrt(abar) eps - sqrt(1 - abar) x0
    assert v.flatten().tolist() == pytest.approx([0.8 * -1 - 0.6 * 2, 0.6 * -1 - 0.8 * 2])
    with pytest.raises(ValueError, match="unsupported prediction_type"):
        objectives.diffusion_target(x0, noise, t, abar, "x_prediction")


@pytest.mark.parametrize("eta", [0.5, 1.0, 3.0])
def test_negative_guidance_points_away_from_the_concept(eta):
    uncond = torch.tensor([1.0, -2.0, 0.5])
    cond = torch.tensor([3.0, -2.0, -0.5])  # the concept's direction: cond - uncond = (2, 0, -1)
    target = objectives.negative_guidance(uncond, cond, eta)
    assert target.tolist() == pytest.approx([1.0 - 2 * eta, -2.0, 0.5 + eta])
    # the target lies on the far side of the unconditional prediction, eta times the concept's length away
    away = target - uncond
    direction = cond - uncond
    assert float(away @ direction) == pytest.approx(-eta * float(direction @ direction))


def test_mse_is_float32_and_does_not_differentiate_the_target():
    pred = torch.tensor([1.0, 2.0], dtype=torch.float16, requires_grad=True)
    target = torch.tensor([0.0, 0.0], requires_grad=True)
    loss = objectives.mse(pred, target)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(2.5)
    loss.backward()
    assert target.grad is None and pred.grad.tolist() == pytest.approx([1.0, 2.0])


# ------------------------------------------------------------------------- targets of the engine

def _batch(u, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = u.unet.config.sample_size
    x = torch.randn(n, u.unet.config.in_channels, size, size, generator=g)
    t = torch.randint(0, u.num_train_timesteps, (n,), generator=g)
    return x, t


@pytest.fixture(scope="module")
def moved(untrained_world):
    """TRUST (diag) on "red" after 3 steps at a high learning rate: the weights have moved away from
    the original and the Hutchinson diagonal holds one probe. Tests take deep copies and change
    the config fields `update` reads (hessian, alpha, lam, forget_objective) on their copy."""
    u = TrustUnlearner(copy.deepcopy(untrained_world), "red", tiny_config(min_row_updates=1, lr=0.05, diag_interval=10))
    for _ in range(3):
        u.step()
    assert any(not torch.equal(p, p0) for p, p0 in zip(u.params, u.theta0))
    assert u.hutchinson.count > 0 and u.step_count % 10 != 0  # the next step folds in no new probe
    return u


def _copy(u, **config):
    twin = copy.deepcopy(u)
    for k, v in config.items():
        setattr(twin.config, k, v)
    return twin


@torch.no_grad()
def _original(unet, x, t, cond):
    return unet(x, t, encoder_hidden_states=cond).sample


@pytest.mark.parametrize("objective", ["anchor", "esd"])
def test_forget_targets_come_from_the_original_model(untrained_world, moved, objective):
    """After steps that moved the weights, the targets still use the original UNet: the anchor
    prediction, or ESD's uncond - eta (cond - uncond) with eta 2."""
    u = _copy(moved, forget_objective=objective, eta=2.0)
    x, t = _batch(u)
    cond = encode_prompts(u.pipe, ["a red circle"] * 4)
    anchor = encode_prompts(u.pipe, ["a blue circle"] * 4)
    original = untrained_world.unet
    target = u.forget_target(x, t, cond, anchor)
    if objective == "anchor":
        expected = _original(original, x, t, anchor)
    else:
        uncond = encode_prompts(u.pipe, [""]).expand(4, -1, -1)
        e_u, e_c = _original(original, x, t, uncond), _original(original, x, t, cond)
        expected = e_u - 2.0 * (e_c - e_u)
    torch.testing.assert_close(target, expected, rtol=1e-4, atol=1e-5)
    # and the loss regresses the edited model onto it
    pred = u.unet(x, t, encoder_hidden_states=cond).sample
    assert u.forget_loss(x, t, cond, anchor).item() == pytest.approx(F.mse_loss(pred, expected).item(), rel=1e-4)


# ------------------------------------------------------------------------------- update terms

def _captured_update(u, x, t, cond, anchor, x_r, t_r, cond_r) -> dict:
    """Run u.update on the given batches; return the gradients handed to the optimizer (by
    param position) and the rows it selected."""
    seen = {}
    real = u.optimizer.step

    def step(*a, **k):
        seen["grads"] = [p.grad.detach().clone() for p in u.params]
        return real(*a, **k)

    u.optimizer.step = step
    try:
        stats = u.update(u.forget_loss(x, t, cond, anchor), u.retain_loss(x_r, t_r, cond_r))
    finally:
        del u.optimizer.step
    assert not stats["skipped"]
    seen["rows"] = [r.clone() for r in u.selected_rows]
    return seen


def _selected(u, rows, tensors):
    """`tensors` (one per target param) on the rows selected for each one's target; the optimizer's
    gradients must be zero elsewhere (the step holds gradients on the selected rows only)."""
    per_param = [rows[k] for k, t in enumerate(u.targets) for _ in t.params]
    return [x.index_select(0, r.to(x.device)) for x, r in zip(tensors, per_param)]


def _zero_outside(u, rows, grads):
    per_param = [rows[k] for k, t in enumerate(u.targets) for _ in t.params]
    for g, r in zip(grads, per_param):
        rest = torch.ones(g.shape[0], dtype=torch.bool)
        rest[r] = False
        assert not g[rest].any()


def _batches(u):
    x, t = _batch(u, seed=1)
    x_r, t_r = _batch(u, seed=2)
    return (x, t, encode_prompts(u.pipe, ["a red circle", "a red square", "red triangle", "a red plain circle"]),
            encode_prompts(u.pipe, ["a blue circle", "a blue square", "blue triangle", "a blue plain circle"]),
            x_r, t_r, encode_prompts(u.pipe, ["a green circle", "a blue square", "a yellow triangle", "a green square"]))


def _retain_grad(u, original_unet, x_r, t_r, cond_r, params_dtype=torch.float32, shift=None):
    """grad of || unet(x) - original(x) ||^2 w.r.t. the target params, on a copy (float64 if asked),
    with the target params optionally shifted by `shift` (a list like u.params)."""
    edited = copy.deepcopy(u.unet).to(params_dtype)
    names = dict(u.unet.named_parameters())
    pos = {id(p): k for k, p in enumerate(u.params)}
    mine = {n: p for n, p in edited.named_parameters() if id(names[n]) in pos}
    order = sorted(mine, key=lambda n: pos[id(names[n])])
    with torch.no_grad():
        if shift is not None:
            for n in order:
                mine[n].add_(shift[pos[id(names[n])]].to(params_dtype))
        frozen = copy.deepcopy(original_unet).to(params_dtype)
        target = frozen(x_r.to(params_dtype), t_r, encoder_hidden_states=cond_r.to(params_dtype)).sample
    for n, p in edited.named_parameters():
        p.requires_grad_(n in mine)
    pred = edited(x_r.to(params_dtype), t_r, encoder_hidden_states=cond_r.to(params_dtype)).sample
    loss = ((pred - target) ** 2).mean()
    return list(torch.autograd.grad(loss, [mine[n] for n in order]))


def test_the_retain_term_adds_exactly_alpha_times_the_retain_gradient(untrained_world, moved):
    u = moved
    with_retain, without = _copy(u, hessian="none", alpha=3.0), _copy(u, hessian="none", alpha=0.0)
    batches = _batches(u)
    a, b = _captured_update(with_retain, *batches), _captured_update(without, *batches)
    assert all(torch.equal(r1, r2) for r1, r2 in zip(a["rows"], b["rows"]))  # rows follow the forget gradient
    expected = _selected(u, a["rows"], _retain_grad(u, untrained_world.unet, *batches[4:]))
    _zero_outside(u, a["rows"], a["grads"])
    for ga, gb, e in zip(_selected(u, a["rows"], a["grads"]), _selected(u, a["rows"], b["grads"]), expected):
        torch.testing.assert_close(ga - gb, 3.0 * e, rtol=1e-3, atol=1e-6)
    assert max(float(e.abs().max()) for e in expected if e.numel()) > 0


def test_the_hvp_term_adds_exactly_lam_times_the_retain_hessian_times_delta(untrained_world, moved):
    u = moved
    delta = [p.detach() - p0 for p, p0 in zip(u.params, u.theta0)]
    with_h = _copy(u, hessian="hvp", hvp_interval=1, lam=50.0)
    without = _copy(u, hessian="hvp", hvp_interval=1, lam=0.0)
    batches = _batches(u)
    a, b = _captured_update(with_h, *batches), _captured_update(without, *batches)
    # H_r delta by central differences of the float64 retain gradient along delta
    h = 1e-3
    plus = _retain_grad(u, untrained_world.unet, *batches[4:], torch.float64, [h * d for d in delta])
    minus = _retain_grad(u, untrained_world.unet, *batches[4:], torch.float64, [-h * d for d in delta])
    assert all(torch.equal(r1, r2) for r1, r2 in zip(a["rows"], b["rows"]))
    hv = _selected(u, a["rows"], [(gp - gm) / (2 * h) for gp, gm in zip(plus, minus)])
    scale = max(float(x.abs().max()) for x in hv if x.numel())
    assert scale > 0
    _zero_outside(u, a["rows"], a["grads"])
    for ga, gb, e in zip(_selected(u, a["rows"], a["grads"]), _selected(u, a["rows"], b["grads"]), hv):
        torch.testing.assert_close((ga - gb).double(), 50.0 * e, rtol=2e-2, atol=2e-3 * 50.0 * scale)


def test_the_diag_term_enters_the_selected_rows_first_moments_exactly(moved):
    """MaskedAdamW fuses lam * h * (p - p0) into the gradient: on the selected rows the first
    moments of a lam=L and a lam=0 copy differ by (1 - beta1) * L * h * Delta, with h the
    clamped Hutchinson diagonal and Delta taken before the step (no diagonal refresh in it)."""
    u = moved
    with_h, without = _copy(u, lam=20.0), _copy(u, lam=0.0)
    for v in (with_h, without):
        v.hessian.set_penalty()
    h = [d.clamp(min=0) for d in u.hutchinson.diags]
    delta = [p.detach() - p0 for p, p0 in zip(u.params, u.theta0)]
    batches = _batches(u)
    a, b = _captured_update(with_h, *batches), _captured_update(without, *batches)
    for ga, gb in zip(a["grads"], b["grads"]):
        assert torch.equal(ga, gb)  # the penalty is fused in the optimizer, not in the gradient
    beta1 = u.config.betas[0]
    pos = {id(p): k for k, p in enumerate(u.params)}
    checked = moved = 0
    for target, rows in zip(u.targets, a["rows"]):
        for p_a, p_b, p in zip((with_h.params[pos[id(q)]] for q in target.params),
                               (without.params[pos[id(q)]] for q in target.params), target.params):
            k = pos[id(p)]
            sa, sb = with_h.optimizer.state[p_a], without.optimizer.state[p_b]
            m_a = sa["exp_avg"][sa["slot_of_row"][rows].long()]
            m_b = sb["exp_avg"][sb["slot_of_row"][rows].long()]
            expected = (1 - beta1) * 20.0 * (h[k] * delta[k]).reshape(h[k].shape[0], -1)[rows].float()
            torch.testing.assert_close(m_a - m_b, expected, rtol=1e-3, atol=1e-7)
            checked += rows.numel()
            moved += int((expected != 0).any(dim=1).sum())
    assert checked > 0 and moved > 0


# ------------------------------------------------------------------------------------------ SalUn

def test_salun_mask_is_the_top_half_of_the_summed_forget_gradient(untrained_world, monkeypatch):
    """With the noising made deterministic, the mask equals static_mask of the gradient of the
    diffusion loss summed over the cached forget images, recomputed here from the pool."""
    u = TrustUnlearner(copy.deepcopy(untrained_world), "red",
                       tiny_config("salun", min_row_updates=1, steps=1, batch_size=8))
    g = torch.Generator().manual_seed(5)
    fixed: list = []

    def noisy(x0, generator, t=None):
        if len(fixed) <= noisy.calls:
            t = torch.randint(0, u.num_train_timesteps, (x0.shape[0],), generator=g)
            fixed.append((torch.randn(x0.shape, generator=g), t))
        n, t = fixed[noisy.calls]
        noisy.calls += 1
        return objectives.add_noise(x0, n, t, u.alphas_cumprod), t, n

    noisy.calls = 0
    monkeypatch.setattr(u.noising, "noised", noisy)
    u.prepare()
    pool, emb = u.pools["forget"], u.emb_forget
    x0_all, cond_all = pool.flatten(0, 1), emb.repeat_interleave(pool.shape[1], 0)
    unet = copy.deepcopy(untrained_world.unet)
    names = dict(u.unet.named_parameters())
    pos = {id(p): k for k, p in enumerate(u.params)}
    mine = sorted(((pos[id(names[n])], p) for n, p in unet.named_parameters() if id(names[n]) in pos))
    sums = [torch.zeros_like(p) for _, p in mine]
    for call, k in enumerate(range(0, x0_all.shape[0], 8)):
        x0 = x0_all[k:k + 8]
        n, t = fixed[call]
        xt = objectives.add_noise(x0, n, t, u.alphas_cumprod)
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=cond_all[k:k + 8]).sample, n)
        for s, gr in zip(sums, torch.autograd.grad(loss, [p for _, p in mine])):
            s.add_(gr)
    expected = static_mask(sums, 0.5)
    agree = sum(int((m == e).sum()) for m, e in zip(u.mask, expected)) / sum(m.numel() for m in u.mask)
    assert agree > 0.999, agree  # float summation order may flip a weight exactly at the threshold
    assert abs(sum(float(m.sum()) for m in u.mask) / sum(m.numel() for m in u.mask) - 0.5) < 0.01
