"""Hessian regularizer: exact HVP against central finite differences (float64), Hutchinson diagonal."""
import torch
from diffusers import UNet2DConditionModel

from trust_fast.hessian import HutchinsonDiagonal, RademacherProbe, grad_and_hvps, hvp
from trust_fast.localize import find_targets, freeze_all_but


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4).double()


def test_hvp_of_the_retain_loss_matches_central_finite_differences():
    unet = tiny_unet()
    targets = find_targets(unet, ("*attn2.to_q", "*attn2.to_k", "*attn2.to_v"))
    freeze_all_but(unet, targets)
    params = [p for t in targets for p in t.params]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([10, 400, 900])
    cond = torch.randn(3, 5, 12, generator=g, dtype=torch.float64)
    target = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)

    def loss_fn():
        return ((unet(x, t, encoder_hidden_states=cond).sample - target) ** 2).mean()

    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    hv = hvp(loss_fn, params, v)

    def grad_at(sign, eps):
        with torch.no_grad():
            for p, vi in zip(params, v):
                p.add_(sign * eps * vi)
        gr = torch.autograd.grad(loss_fn(), params)
        with torch.no_grad():
            for p, vi in zip(params, v):
                p.sub_(sign * eps * vi)
        return gr

    eps = 1e-5
    fd = [(a - b) / (2 * eps) for a, b in zip(grad_at(1, eps), grad_at(-1, eps))]
    num = torch.sqrt(sum(((h - f) ** 2).sum() for h, f in zip(hv, fd)))
    den = torch.sqrt(sum((f ** 2).sum() for f in fd))
    assert den > 1e-6  # the Hessian is not trivially zero along v
    assert num / den < 1e-6, f"relative error {float(num / den):.2e}"


def test_grad_and_hvps_give_the_gradient_and_several_products():
    a = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    w = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    loss = 0.5 * w @ a @ w + (w ** 3).sum()
    e1, e2 = torch.eye(2, dtype=torch.float64)
    grads, (h1, h2) = grad_and_hvps(loss, [w], [[e1], [e2]])
    hess = a + torch.diag(6 * w.detach())
    assert torch.allclose(grads[0], a @ w.detach() + 3 * w.detach() ** 2)
    assert torch.allclose(h1[0], hess[:, 0]) and torch.allclose(h2[0], hess[:, 1])


def test_hutchinson_diagonal_converges_to_the_true_diagonal():
    torch.manual_seed(0)
    n = 6
    q = torch.randn(n, n)
    a = q @ q.T + torch.eye(n)
    w = torch.randn(n, requires_grad=True)
    est = HutchinsonDiagonal([w], torch.Generator().manual_seed(0))
    for _ in range(400):
        g = est.update(0.5 * w @ a @ w)
    assert torch.allclose(g[0], a @ w.detach(), atol=1e-4)
    err = (est.diags[0] - a.diag()).abs().max() / a.diag().abs().max()
    assert est.count == 400 and err < 0.25, f"relative error {float(err):.3f}"


def test_a_rademacher_probe_is_its_seed_and_gives_the_products_of_its_tensors():
    """A probe is redrawn from its seed, never held: the same +-1 tensors every time, different ones
    per tensor and per seed, and grad_and_hvps gives H z for them as for explicit vectors (the
    products are exact for a quadratic loss); `keep` sees the gradients before the products."""
    torch.manual_seed(0)
    a, b = torch.randn(5, 5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    a = a @ a.T
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    params = [w, v]

    def loss():
        return 0.5 * w @ a @ w + (v * b).sum() * (w ** 2).sum()

    z = RademacherProbe(params, 123)
    z0, z1 = z.tensor(0), z.tensor(1)
    assert z0.dtype == torch.float64 and set(z0.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(z.tensor(0), z0) and torch.equal(z.tensor(1, torch.float32), z1.float())
    assert not torch.equal(RademacherProbe(params, 124).tensor(1), z1)
    seen = []
    grads, (hz,) = grad_and_hvps(loss(), params, [z], keep=lambda gs: seen.append(len(gs)) or [g[:2] for g in gs])
    _, (want,) = grad_and_hvps(loss(), params, [[z0, z1]])
    assert seen == [2] and [g.shape[0] for g in grads] == [2, 2]
    for got, exp in zip(hz, want):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-12)
    g_full = torch.autograd.grad(loss(), params)
    torch.testing.assert_close(grads[0], g_full[0][:2])


def test_a_loss_in_parts_gives_the_gradient_and_products_of_the_whole():
    """grad_and_hvps of a loss given as parts (micro-batches) sums the parts' gradients and products,
    for a seeded probe and explicit vectors alike, and leaves the params' own .grad as it was."""
    torch.manual_seed(1)
    x = torch.randn(6, 3, dtype=torch.float64)
    w = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    w.grad = torch.full_like(w, 7.0)

    def loss(rows):
        return ((torch.tanh(x[rows] @ w + b)) ** 2).sum() / 6

    vectors = [RademacherProbe([w, b], 5), [torch.randn(3, 2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)],
               RademacherProbe([w, b], 6)]
    g_whole, h_whole = grad_and_hvps(loss(slice(None)), [w, b], vectors)
    g_parts, h_parts = grad_and_hvps([lambda: loss(slice(0, 4)), lambda: loss(slice(4, 6))], [w, b], vectors)
    for got, want in zip(g_parts, g_whole):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert len(h_parts) == 3
    for hp, hw in zip(h_parts, h_whole):
        for got, want in zip(hp, hw):
            assert want.abs().max() > 0
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert torch.equal(w.grad, torch.full_like(w, 7.0)) and b.grad is None
