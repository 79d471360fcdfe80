"""The leak scan (trust_fast.evaluation.leak): per-prompt and pooled rates from what the classifier
sees, on the shipped world; and the classifier-free scan of a user's prompts."""
import copy

import pytest
import torch

from trust_fast.concepts import parse_concept
from trust_fast.evaluation.leak import generic_leak_scan, leak_scan
from trust_fast.evaluation.metrics import wilson
from trust_fast.world.concepts import leak_prompts


class _Says:
    """A stand-in classifier whose verdict for image i is verdicts[i % len(verdicts)] (class indices)."""

    def __init__(self, verdicts):
        self.verdicts = verdicts
        self.p = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self.p])

    def predict(self, images):
        n = images.shape[0]
        return {a: torch.tensor([self.verdicts[i % len(self.verdicts)][a] for i in range(n)])
                for a in self.verdicts[0]}


def test_rates_are_counted_per_prompt_and_pooled_per_description(shapes_pipe):
    """A classifier that sees red circles in every other image: each prompt's rate is 1/2 (its two
    images), every description pools to 1/2, and the counts, intervals and order follow."""
    spec = parse_concept("red+circle")
    red_circle = {"color": 0, "shape": 0, "texture": 0}
    blue_square = {"color": 2, "shape": 1, "texture": 0}
    r = leak_scan(shapes_pipe, spec, _Says([red_circle, blue_square]), n_per_prompt=2, steps=1)
    entries = leak_prompts(spec)
    assert r["leak_n_images"] == 2 * len(entries) and r["leak_n_prompts"] == len({p for p, _ in entries})
    assert r["leak_max"] == 0.5 and r["leak_max_ci"] == list(wilson(*[r["leak_by_description"][
        r["leak_max_description"]][k] for k in ("k", "n")]))
    empty = r["leak_by_prompt"][""]
    assert (empty["k"], empty["n"]) == (5, 10)  # once per template: five prompts' worth of images
    assert r["leak_by_description"]["(empty prompt)"]["n"] == 10
    assert {"red", "circle", "striped red", "shape", "red circle"} <= set(r["leak_by_description"])
    assert len(r["leak_worst"]) == 5 and all(w["rate"] == 0.5 for w in r["leak_worst"])


def test_the_worst_description_is_found():
    """Images of prompt i show the concept only for the prompts naming "red" alone: those lead."""
    spec = parse_concept("red+circle")

    class Pipe:  # stands in for the sampler: leak_scan only samples and classifies
        pass

    entries = leak_prompts(spec)
    leaking = [i for i, (p, a) in enumerate(entries) if a == {"color": "red"}]
    verdicts = [{"color": 0 if i in leaking else 1, "shape": 0, "texture": 0} for i in range(len(entries))]
    import trust_fast.evaluation.leak as leak

    calls = []

    def fake_sample(pipe, prompts, n, seed, steps, guidance):
        calls.append(len(prompts))
        return torch.zeros(len(prompts) * n, 3, 16, 16)

    real = leak.sample_images
    leak.sample_images = fake_sample
    try:
        r = leak_scan(Pipe(), spec, _Says(verdicts), n_per_prompt=1)
    finally:
        leak.sample_images = real
    assert sum(calls) == len(entries)
    assert r["leak_max_description"] == "red" and r["leak_max"] == 1.0
    assert {w["prompt"] for w in r["leak_worst"]} <= {p for i, (p, _) in enumerate(entries) if i in leaking}
    assert r["leak_by_description"]["red circle"]["rate"] == 0.0


@pytest.mark.slow
def test_the_original_model_draws_the_pair_for_its_partial_prompts(shapes_pipe, classifier):
    """On the shipped (not unlearned) model the scan finds the pair where it is asked for, and also
    under prompts that name only one of its parts: the leak the partial prompts of a run erase."""
    r = leak_scan(shapes_pipe, parse_concept("red+circle"), classifier, n_per_prompt=1)
    by = r["leak_by_description"]
    assert by["red circle"]["rate"] >= 0.8
    assert by["red"]["rate"] >= 0.15 and by["circle"]["rate"] >= 0.1
    assert r["leak_max"] >= by["red circle"]["rate"] and r["leak_max_description"] in by


def test_generic_scan_measures_each_prompt_against_the_original(shapes_pipe):
    prompts = ["a red circle", "a blue square", ""]
    same = generic_leak_scan(shapes_pipe, shapes_pipe, prompts, n_per_prompt=2, steps=3)
    assert same["leak_min_change"] == 0.0 and set(same["leak_change_by_prompt"]) == set(prompts)
    moved = copy.deepcopy(shapes_pipe)
    with torch.no_grad():
        for p in moved.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    r = generic_leak_scan(moved, shapes_pipe, prompts, n_per_prompt=2, steps=3)
    assert r["leak_min_change"] > 0 and [e["prompt"] for e in r["leak_least_changed"]] == sorted(
        prompts, key=r["leak_change_by_prompt"].get)
    with pytest.raises(ValueError, match=">= 2"):
        generic_leak_scan(moved, shapes_pipe, prompts, n_per_prompt=1)
    with pytest.raises(ValueError, match="empty"):
        generic_leak_scan(moved, shapes_pipe, [])
