"""Evaluation harness pieces that need no trained model."""
import pytest
import torch

from trust_fast.evaluation import frechet_distance
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
