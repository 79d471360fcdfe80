"""The shapes world: generator, tokenizer, classifier, shipped pipeline, and its quality bar."""
import json
import os

import pytest
import torch

from trust_fast.world import generate, vocab


def test_generator_is_deterministic_and_varied():
    a, b, c = generate(64, seed=7), generate(64, seed=7), generate(64, seed=8)
    assert torch.equal(a.images, b.images)
    assert all(torch.equal(a.labels[k], b.labels[k]) for k in a.labels)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (64, 3, 16, 16) and a.images.min() >= -1 and a.images.max() <= 1
    big = generate(400, seed=1)
    for attr, vals in vocab.ATTRIBUTES.items():
        assert set(big.labels[attr].tolist()) == set(range(len(vals))), attr


def test_vocabulary_meets_the_world_spec():
    assert len(vocab.ATTRIBUTES["color"]) >= 4 and len(vocab.ATTRIBUTES["shape"]) >= 3
    assert len(vocab.ATTRIBUTES["texture"]) >= 2
    for attr in ("color", "shape"):
        assert all(len(syn) >= 1 for syn in vocab.ATTRIBUTES[attr].values())
    assert vocab.meaning("crimson").value == "red"
    with pytest.raises(ValueError, match="not a word of the shapes world"):
        vocab.meaning("purple")


def test_every_world_word_is_one_token(shapes_pipe):
    tok = shapes_pipe.tokenizer
    for w in vocab.all_words():
        ids = tok(w).input_ids
        assert len(ids) == 3, (w, tok.convert_ids_to_tokens(ids))


def test_classifier_accuracy_on_held_out_images(classifier):
    b = generate(1000, seed=424242)
    pred = classifier.predict(b.images)
    for attr in vocab.ATTRIBUTES:
        acc = (pred[attr] == b.labels[attr]).float().mean().item()
        assert acc >= 0.99, (attr, acc)


def test_pipeline_round_trip_gives_same_images(shapes_pipe, tmp_path):
    from diffusers import DiffusionPipeline

    from trust_fast import ShapesPipeline  # noqa: F401  (the import registers it with diffusers)

    shapes_pipe.save_pretrained(tmp_path / "p")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "p", local_files_only=True)
    assert type(loaded).__name__ == "ShapesPipeline"
    loaded.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=5, output_type="latent")
    a = shapes_pipe(["a red circle", "a striped blue square"], generator=torch.Generator().manual_seed(3), **kw).images
    b = loaded(["a red circle", "a striped blue square"], generator=torch.Generator().manual_seed(3), **kw).images
    assert torch.equal(a, b)


def test_shipped_assets_are_small_and_recorded():
    from trust_fast.world import ASSETS

    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ASSETS) for f in fs)
    assert total < 20 * 2**20, total
    with open(os.path.join(ASSETS, "shapes", "training.json")) as f:
        log = json.load(f)
    assert log["seconds"] > 0 and log["steps_done"] > 0 and log["config"]["seed"] == 0


def test_quality_bar_on_a_ci_sized_sample(shapes_pipe, classifier):
    from trust_fast.world.quality import measure_quality

    q = measure_quality(shapes_pipe, classifier, n_per_prompt=1, seed=1234, every_template=False)
    assert q["color_acc"] >= 0.98, q
    assert q["shape_acc"] >= 0.95, q
    assert q["texture_acc"] >= 0.95, q
    assert q["all_acc"] >= 0.90, q
    assert q["synonym_agreement"] >= 0.95, q


def test_training_code_runs_a_few_steps():
    from trust_fast.world.train import ClassifierTrainConfig, DiffusionTrainConfig, train_classifier, train_diffusion

    clf, log = train_classifier(ClassifierTrainConfig(steps=3, batch=16), progress=False)
    assert log["final_loss"] > 0 and clf.predict(generate(2, 0).images)["color"].shape == (2,)
    pipe, log = train_diffusion(DiffusionTrainConfig(steps=3, batch=4, warmup=1), progress=False)
    assert log["steps_done"] == 3 and torch.isfinite(torch.tensor(log["loss_last_200"]))
