"""Evaluation harness pieces that need no trained model."""
import pytest
import torch

from trust_fast.evaluation import frechet_distance
from trust_fast.softprompt import prefix_hook, prefixed_ids
from trust_fast.evaluation.metrics import attribute_accuracy, format_table


def test_frechet_distance_properties():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g)
    a = a - a.mean(0)  # centred, so scaling moves only the covariance
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shifted = a + torch.tensor([2.0, 0, 0, 0, 0, 0])
    assert frechet_distance(a, shifted) == pytest.approx(4.0, rel=1e-6)  # only the mean moved
    scaled = a * 2.0  # covariance x4: tr(S) + tr(4S) - 2 tr(2S) = tr(S)
    assert frechet_distance(a, scaled) == pytest.approx(torch.cov(a.T.double()).trace().item(), rel=1e-6)
    b = torch.randn(400, 6, generator=g)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(a[:1], b)


def test_attribute_accuracy_and_table():
    preds = [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "circle"}]
    truth = [{"color": "red", "shape": "circle"}, {"color": "red", "shape": "circle"}]
    acc = attribute_accuracy(preds, truth)
    assert acc == {"color_acc": 0.5, "shape_acc": 1.0, "all_acc": 0.5}
    table = format_table([("m", {"ua": 0.25, "n": 3})], ["ua", "n"])
    assert "0.250" in table and table.splitlines()[0].split() == ["ua", "n"]


def test_prefix_hook_replaces_exactly_the_prefix_positions():
    from trust_fast.world.train import build_untrained_pipeline

    pipe = build_untrained_pipeline()
    te, tok = pipe.text_encoder, pipe.tokenizer
    ids = prefixed_ids(tok, ["a red circle"], k=3)
    assert ids.shape == (1, tok.model_max_length)
    emb = te.get_input_embeddings()
    prefix = torch.randn(3, emb.weight.shape[1], requires_grad=True)
    captured = {}
    handle = emb.register_forward_hook(lambda m, i, o: captured.setdefault("plain", o.detach().clone()))
    te(ids)
    handle.remove()
    with prefix_hook(te, prefix):
        out = te(ids)[0]
        inner = emb(ids)
    assert torch.equal(inner[0, 1:4], prefix.detach())
    assert torch.equal(inner[0, 0], captured["plain"][0, 0]) and torch.equal(inner[0, 4:], captured["plain"][0, 4:])
    out.sum().backward()
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0
    assert len(emb._forward_hooks) == 0
