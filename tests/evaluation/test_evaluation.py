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


def test_retain_prompts_get_their_own_sample_size(shapes_pipe, classifier, tmp_path):
    """full_report(retain_n_per_prompt=k): retain accuracy, fd and the retain grid use k images per
    retain prompt while UA keeps n_per_prompt per forget prompt (a pair's 2 forget prompts need many
    images each, its 22 retain prompts fewer)."""
    from trust_fast.concepts import parse_concept
    from trust_fast.evaluation import full_report
    from trust_fast.world.concepts import world_prompts

    spec = parse_concept("red+circle")
    prompts = world_prompts(spec)
    r = full_report(shapes_pipe, spec, shapes_pipe, classifier=classifier, n_per_prompt=3, steps=2,
                    retain_n_per_prompt=1, grids=str(tmp_path / "grids"))
    assert r["n_forget"] == 3 * len(prompts.forget) and r["n_retain"] == len(prompts.retain)
    assert r["fd_n"] == len(prompts.retain)
    assert sorted(r["grids"]) == ["forget.png", "retain.png"] and (tmp_path / "grids" / "retain.png").stat().st_size
