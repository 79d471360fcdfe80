"""End to end on the built-in model: TRUST erases a concept within CI time and keeps the rest."""
import copy

import pytest

from trust_fast import TrustConfig, TrustUnlearner
from trust_fast.concepts import parse_concept
from trust_fast.evaluation import evaluate


@pytest.mark.slow
def test_trust_erases_red_and_keeps_the_rest(shapes_pipe, classifier):
    pipe = copy.deepcopy(shapes_pipe)
    spec = parse_concept("red")
    before = evaluate(pipe, spec, classifier, n_per_prompt=2, steps=15)
    unlearner = TrustUnlearner(pipe, spec, TrustConfig(steps=30, x0_per_prompt=1))
    history = unlearner.run()
    after = evaluate(pipe, spec, classifier, n_per_prompt=2, steps=15)
    assert before["ua"] >= 0.8
    assert after["ua"] <= 0.25, (before["ua"], after["ua"])
    assert after["retain_acc"] >= 0.85 * before["retain_acc"], (before["retain_acc"], after["retain_acc"])
    assert sum(s["selected_fraction"] for s in history) / len(history) <= 0.10
    # the shapes of the red prompts survive: they are drawn in another color, not destroyed
    assert after["forget_shape_acc"] >= 0.75 * before["forget_shape_acc"]
    # the classifier-free report (what models outside the world get) sees the same thing without the
    # classifier: the red prompts' images moved far more than the other prompts' images
    from trust_fast.world.concepts import world_prompts
    from trust_fast.evaluation import generic_report

    prompts = world_prompts(spec)
    free = generic_report(pipe, shapes_pipe, prompts.forget[:6], prompts.retain[::6], n_per_prompt=2, steps=15)
    assert free["space"] == "pixel"
    assert free["forget_change"] >= 3 * free["retain_change"], free
    assert free["retain_change"] <= 0.5, free
