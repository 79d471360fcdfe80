"""Localization: target resolution, freezing, planted-row selection, SalUn's static mask."""
import pytest
import torch
from torch import nn

from trust_fast.localize import DynamicLocalizer, find_targets, freeze_all_but, saliency, select, static_mask


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.attn2 = nn.Module()
        self.attn2.to_q = nn.Linear(d, 32, bias=False)
        self.attn2.to_k = nn.Linear(d, 24, bias=False)
        self.attn2.to_v = nn.Linear(d, 40)
        self.attn2.to_out = nn.ModuleList([nn.Linear(40, d)])
        self.ff = nn.Conv2d(d, 8, 3)
        self.norm = nn.GroupNorm(4, d)


def toy_model():
    torch.manual_seed(0)
    return nn.ModuleDict({"down": Block(), "up": Block()})


def test_globs_pick_the_cross_attention_projections_and_freeze_the_rest():
    m = toy_model()
    targets = find_targets(m, ("*attn2.to_q", "*attn2.to_k", "*attn2.to_v"))
    assert [t.name for t in targets] == [f"{b}.attn2.to_{x}" for b in ("down", "up") for x in "qkv"]
    assert targets[2].bias is m["down"].attn2.to_v.bias and targets[0].bias is None
    n = freeze_all_but(m, targets)
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert n == sum(p.numel() for p in trainable) == 2 * (16 * 32 + 16 * 24 + 16 * 40 + 40)
    assert not m["down"].ff.weight.requires_grad and not m["up"].attn2.to_out[0].weight.requires_grad
    esd = find_targets(m, ("*attn2.*",))
    assert {t.name.split(".", 2)[2] for t in esd} == {"to_q", "to_k", "to_v", "to_out.0"}
    with pytest.raises(ValueError, match="no module"):
        find_targets(m, ("*attn3.to_q",))


def test_a_planted_gradient_row_is_selected_and_nothing_else():
    m = toy_model()
    targets = find_targets(m, ("*attn2.to_q", "*attn2.to_k", "*attn2.to_v"))
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(t.weight.shape, generator=g) * 1e-3 for t in targets]
    grads[1][7] *= 50.0   # one concept neuron in down.attn2.to_k
    grads[5][3] *= 50.0   # and one in up.attn2.to_v
    scores = saliency(targets, grads)
    rows = select(targets, scores, xi=2.0)
    assert 7 in rows[1].tolist() and 3 in rows[5].tolist()
    assert sum(r.numel() for r in rows) <= 0.1 * scores.numel()
    # one outlier among n rows has z close to sqrt(n - 1) (> 4.5 here); noise rows stay far below
    assert [r.tolist() for r in select(targets, scores, xi=4.0)] == [[], [7], [], [], [], [3]]
    # gw mode weighs by |w|: zeroing the planted row's weights removes it
    with torch.no_grad():
        targets[1].weight[7].zero_()
    rows_gw = select(targets, saliency(targets, grads, mode="gw"), xi=4.0)
    assert 7 not in rows_gw[1].tolist() and rows_gw[5].tolist() == [3]


def test_dynamic_localizer_reestimates_on_its_interval():
    m = toy_model()
    targets = find_targets(m, ("*attn2.to_q",))
    loc = DynamicLocalizer(targets, xi=2.0, interval=2)
    def planted(row):
        gs = [torch.full(t.weight.shape, 1e-3) for t in targets]
        gs[0][row] = 1.0
        return gs
    assert loc(0, planted(4))[0].tolist() == [4]
    assert loc(1, planted(9))[0].tolist() == [4]   # reused between re-estimations
    assert loc(2, planted(9))[0].tolist() == [9]
    with pytest.raises(ValueError):
        DynamicLocalizer(targets, interval=0)


def test_static_mask_keeps_the_top_half_of_all_weights_by_summed_gradient():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(10, 6, generator=g), torch.randn(7, generator=g), torch.randn(3, 4, 2, 2, generator=g)]
    masks = static_mask(grads, 0.5)
    flat_g = torch.cat([x.abs().flatten() for x in grads])
    flat_m = torch.cat([x.flatten() for x in masks])
    k = round(0.5 * flat_g.numel())
    assert int(flat_m.sum()) == k
    assert flat_g[flat_m.bool()].min() >= flat_g[~flat_m.bool()].max()  # one global threshold
    assert all(mk.shape == gr.shape for mk, gr in zip(masks, grads))
    with pytest.raises(ValueError):
        static_mask(grads, 0.0)


def test_static_mask_threshold_is_the_kth_largest_magnitude_with_ties_zeros_and_infinities():
    """The bisection on float bit patterns finds what kthvalue of the concatenation finds."""
    from trust_fast.localize import _kth_largest_abs

    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(37, 5, generator=g), torch.zeros(11), torch.tensor([2.0, -2.0, 2.0, float("inf"), -1e-30]),
             torch.randint(-3, 4, (4, 3, 2), generator=g).float(), torch.randn(9, generator=g).to(torch.bfloat16)]
    flat = torch.cat([p.abs().float().flatten() for p in parts])
    for k in (1, 2, 3, 4, 7, 50, flat.numel() // 2, flat.numel() - 1, flat.numel()):
        expected = torch.kthvalue(flat, flat.numel() - k + 1).values
        assert _kth_largest_abs(parts, k) == expected, k
