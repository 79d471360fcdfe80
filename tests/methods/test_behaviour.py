"""Behaviour of unlearning on the shipped shapes world: tests that fail when the algorithm breaks.

Every figure is read by the shipped attribute classifier from images the model draws for prompts
that unlearning never trained on: the held-out templates (``vocab.N_UNLEARN_TEMPLATES`` and up),
with the concept written as itself and as its synonym. Before/after comparisons use the same
initial noise, so they differ only by the model.

The limits come from ``benchmarks/behaviour_spread.py``, which runs the functions below with
training seeds 0-4 (the tests run seed 0); BENCHMARKS.md, "Behaviour tests: measured spread over
seeds", has the per-seed figures. Each limit sits beyond the worst measured seed with a margin,
and each test was checked to fail on a deliberately broken copy of the library (named in the
test's docstring).
"""
from __future__ import annotations

import copy

import pytest

from trust_fast import TrustConfig, TrustUnlearner
from trust_fast.concepts import ConceptSpec, parse_concept
from trust_fast.world.concepts import leak_prompts, shows, world_prompts
from trust_fast.evaluation import embedding_attack, paraphrase_attack, softprompt_attack
from trust_fast.evaluation.metrics import attribute_accuracy, predict_attrs, sample_images
from trust_fast.world import vocab

# ---------------------------------------------------------------- settings (shared with the spread script)

# TrustConfig fields of every run (plus seed): a short run without the adversary, fixed here rather
# than inherited from the defaults, so the measured spread below stays the tests' own
TRAIN = dict(steps=30, x0_per_prompt=1, x0_steps=10, adv_prefix=0)
ADV = dict(adv_prefix=5)                        # the protected run: TrustConfig's adversary, its defaults
SAMPLE_STEPS = 15                               # DDIM steps of every evaluation image
N_FORGET = {"single": 4, "pair": 8}             # images per held-out forget prompt ("red": 12 prompts, pairs 4)
N_RETAIN = {"single": 6, "pair": 4}             # images per held-out retain prompt ("red": 18 prompts, pairs 22)
ATTACK_CONCEPT = "striped"                      # the attack separates the adversary's model only here (below)
ATTACK = dict(k=5, attack_steps=30, lr=0.01, n_images=4, n_per_prompt=8)
EMBEDDING = dict(attack_steps=100, lr=0.01, n_images=4, n_per_prompt=8)  # the embedding attack's defaults
ATTACK_DESCRIPTIONS = (("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "circle"))
N_PARAPHRASE = 2                                # images per prompt of the paraphrase attack
N_PARTIAL = 4                                   # images per held-out prompt naming one part of a pair
HELD_OUT = range(vocab.N_UNLEARN_TEMPLATES, len(vocab.TEMPLATES))

# Limits. Measured with benchmarks/behaviour_spread.py over training seeds 0-4 (same settings; the
# tests run seed 0): "worst" is the worst seed, "broken" the same measurement on a copy of the
# library with the break the test must catch. BENCHMARKS.md, "Behaviour tests: measured spread
# over seeds", has every seed with its image counts and Wilson intervals.
RED = {
    "orig_rate": 0.90,     # original model on the held-out red prompts: 1.000 (48/48) on every seed
    "rate": 0.25,          # after: 0.021-0.146 (worst 7/48)
    "retain_ratio": 0.90,  # held-out retain after/before: 0.943-0.991; retain term dropped: 0.830 at
                           # seed 0 (0.830-0.981 over seeds 0-4: the pair test is the one that always sees it)
}
PAIR = {
    "orig_rate": 0.80,      # original on the held-out red circles: 0.938-1.000 (worst 30/32)
    "rate": 0.20,           # after: 0.000-0.062 (worst 2/32)
    "retain_ratio": 0.80,   # 0.907-0.977; retain term dropped: 0.648-0.711
    "kept_ratio": 0.75,     # red non-circles still red 0.938-1.000x (dropped retain term: 0.000-0.125x);
                            # non-red circles still circles 0.917-1.045x
    "forget_b_kept": 0.80,  # forget images that still show a circle: 0.938-1.000 (worst 30/32)
}
PARAPHRASE = {
    "orig_asr": 0.85,   # 1.000 (24/24) on every seed (Wilson 95% lower end 0.86)
    "agreement": 0.15,  # |ASR - held-out rate on other noise|: 0.000 on every seed
}
SOFTPROMPT = {
    "asr": 0.125,   # optimized attack on the unprotected model: 0.250-0.562 (worst 8/32)
    "gain": 0.125,  # optimized minus lr 0: +0.250-+0.531 (lr 0 alone: 0.000-0.062); opt.step() removed: 0 exactly
}
ADVERSARY = {
    "drop": 0.09,          # unprotected minus adv_prefix=5 ASR: +0.188-+0.375 (worst 6/32); adversary off: 0 exactly
    "retain_ratio": 0.85,  # held-out retain of the adv_prefix=5 model over the original's: 0.957-1.000
}


PARTIAL = {  # red+circle with partial_prompts="on" (TrustConfig's partial_fraction 0.75), the same short runs
    "orig_rate": 0.25,      # original on the held-out prompts naming one part: 0.370-0.406 (worst 71/192)
    "rate": 0.15,           # with partial prompts: 0.031-0.057 (worst 11/192); without: 0.260-0.339
    "drop": 0.12,           # without minus with: +0.219-+0.307
    "kept_ratio": 0.75,     # red non-circles still red 1.000x, other circles still circles 0.917-1.000x
}
# Not asserted: at these short runs (30 steps, no adversary) the partial prompts take 3/4 of each
# forget batch and the pair's own held-out prompts still draw it 0.53-0.72 of the time (0.00-0.06
# without them): the measured trade-off of partial_fraction (BENCHMARKS.md, "Leak scan and partial
# prompts"), why the option is off by default.

DEFAULT_SEEDS = (0, 1)   # training seeds of the test that runs TrustConfig() exactly as shipped (issue #16)
DEFAULT = {
    "rate": 0.05,          # red after the default run, held-out prompts: the bar
    "retain_ratio": 0.90,  # held-out retain after/before
}


def held_out(spec: ConceptSpec) -> dict:
    """Prompts unlearning never sees: the held-out templates, the concept written as its synonym
    and as itself (forget); every other description in the held-out templates (retain)."""
    syn = world_prompts(spec, templates=HELD_OUT, synonyms=True)
    plain = world_prompts(spec, templates=HELD_OUT, synonyms=False)
    return {"forget": syn.forget + plain.forget, "forget_attrs": syn.forget_attrs + plain.forget_attrs,
            "retain": plain.retain, "retain_attrs": plain.retain_attrs}


def partial_held_out(spec: ConceptSpec) -> list[str]:
    """Held-out prompts that name one part of a pair and not the other: the held-out templates,
    each part alone or with a texture, with and without the noun, as itself and as its synonym
    ("a photo of a crimson", "a drawing of a striped disc"); from the leak scan's prompt space."""
    named = {vocab.meaning(t).attribute for t in spec.terms()}
    starts = tuple(vocab.TEMPLATES[t].format("").strip() + " " for t in HELD_OUT)
    return sorted({p for p, a in leak_prompts(spec) if len(named & set(a)) == 1 and p.startswith(starts)})


def training_prompts(spec: ConceptSpec):
    """What TrustUnlearner trains on for a world concept (its own default)."""
    return world_prompts(spec, every_template=True)


def attack_prompts(spec: ConceptSpec) -> list[str]:
    """One forget prompt (training templates) per colour, the shapes rotating: ATTACK_DESCRIPTIONS."""
    p = world_prompts(spec)
    return [next(f for f, a in zip(p.forget, p.forget_attrs) if (a["color"], a["shape"]) == d)
            for d in ATTACK_DESCRIPTIONS]


def unlearn(pipe, concept: str, seed: int, adv: bool = False, partial: bool = False):
    """A copy of `pipe` unlearned with the tests' settings (`partial`: with the partial prompts)."""
    pipe = copy.deepcopy(pipe)
    extra = {**(ADV if adv else {}), **({"partial_prompts": "on"} if partial else {})}
    TrustUnlearner(pipe, concept, TrustConfig(seed=seed, **{**TRAIN, **extra})).run()
    return pipe


def unlearn_default(pipe, concept: str, seed: int):
    """A copy of `pipe` unlearned with TrustConfig() as shipped (only the seed set)."""
    pipe = copy.deepcopy(pipe)
    TrustUnlearner(pipe, concept, TrustConfig(seed=seed)).run()
    return pipe


def measure(pipe, classifier, spec: ConceptSpec, seed: int, forget: bool = True) -> dict:
    """What the classifier sees in images of the held-out prompts.

    rate: fraction of forget images showing the concept (n_forget images); retain: fraction of
    retain images with every attribute right (n_retain). For a two-term concept also, from the
    prompts' ground truth and the classifier's predictions: a_kept / b_kept, the fraction of the
    retain images of A without B (B without A) that show A (B) (n_a, n_b images), and
    forget_b_kept, the fraction of forget images that still show B (A is what gets replaced).
    `forget` False: the retain figures only."""
    kind = "single" if spec.b is None else "pair"
    n_f, n_r = N_FORGET[kind], N_RETAIN[kind]
    h = held_out(spec)
    r_pred = predict_attrs(classifier, sample_images(pipe, h["retain"], n_r, seed + 1, SAMPLE_STEPS))
    r_truth = [a for a in h["retain_attrs"] for _ in range(n_r)]
    out = {"retain": attribute_accuracy(r_pred, r_truth)["all_acc"], "n_retain": len(r_pred)}
    if forget:
        f_pred = predict_attrs(classifier, sample_images(pipe, h["forget"], n_f, seed, SAMPLE_STEPS))
        out.update(rate=sum(shows(spec, p) for p in f_pred) / len(f_pred), n_forget=len(f_pred))
    if spec.b is not None:
        for name, has, lacks in (("a", spec.a, spec.b), ("b", spec.b, spec.a)):
            attr, other = vocab.meaning(has).attribute, vocab.meaning(lacks).attribute
            idx = [i for i, t in enumerate(r_truth) if t[attr] == has and t[other] != lacks]
            out[f"{name}_kept"] = sum(r_pred[i][attr] == has for i in idx) / len(idx)
            out[f"n_{name}"] = len(idx)
        if forget:
            b_attr = vocab.meaning(spec.b).attribute
            out["forget_b_kept"] = sum(p[b_attr] == spec.b for p in f_pred) / len(f_pred)
    return out


def measure_partial(pipe, classifier, spec: ConceptSpec, seed: int) -> dict:
    """How often the held-out prompts naming one part of a pair (partial_held_out) draw the pair."""
    prompts = partial_held_out(spec)
    pred = predict_attrs(classifier, sample_images(pipe, prompts, N_PARTIAL, seed + 2, SAMPLE_STEPS))
    hits = sum(shows(spec, p) for p in pred)
    return {"rate": hits / len(pred), "hits": hits, "n": len(pred)}


def attack(pipe, original, classifier, spec: ConceptSpec, seed: int, lr: float | None = None) -> dict:
    """The soft-prompt attack with the tests' settings; `lr` 0 keeps the random starting prefix."""
    cfg = dict(ATTACK, **({} if lr is None else {"lr": lr}))
    r = softprompt_attack(pipe, original, spec, classifier, seed=seed, steps=SAMPLE_STEPS,
                          prompts=attack_prompts(spec), **cfg)
    return {"asr": r["asr_softprompt"], "hits": r["asr_softprompt_hits"], "n": r["asr_softprompt_n"]}


def embedding(pipe, original, classifier, spec: ConceptSpec, seed: int) -> dict:
    """The embedding attack (every token of the prompt free) on the soft-prompt attack's prompts."""
    r = embedding_attack(pipe, original, spec, classifier, seed=seed, steps=SAMPLE_STEPS,
                         prompts=attack_prompts(spec), **EMBEDDING)
    return {"asr": r["asr_embedding"], "hits": r["asr_embedding_hits"], "n": r["asr_embedding_n"]}


def paraphrase(pipe, classifier, spec: ConceptSpec, seed: int) -> dict:
    r = paraphrase_attack(pipe, spec, classifier, n_per_prompt=N_PARAPHRASE, seed=seed, steps=SAMPLE_STEPS)
    return {"asr": r["asr_paraphrase"], "hits": r["asr_paraphrase_hits"], "n": r["asr_paraphrase_n"],
            "prompts": r["paraphrase_prompts"]}


# ---------------------------------------------------------------- cached runs (one training per model)

SEED = 0                # the tests' training and evaluation seed (the spread script runs 0-4)
_models: dict = {}
_results: dict = {}


def _once(store: dict, key, make):
    if key not in store:
        store[key] = make()
    return store[key]


def _model(shapes_pipe, concept: str, adv: bool = False, partial: bool = False):
    """(key, unlearned model), trained once per session. Keyed by what training sees:
    "red+circle" and "red|circle" have the same prompt sets in the world (asserted by
    test_pair_concepts_train_on_the_same_prompts), so they are one training run."""
    spec = parse_concept(concept)
    p = training_prompts(spec)
    key = (tuple(p.forget), tuple(p.anchors), tuple(p.retain), tuple(p.neighbors(spec)), adv, partial)
    return key, _once(_models, key, lambda: unlearn(shapes_pipe, concept, SEED, adv, partial))


def _measure(model_key, pipe, classifier, concept: str, forget: bool = True) -> dict:
    """measure(), once per model and held-out set ("red+circle" and "red|circle" share theirs)."""
    spec = parse_concept(concept)
    h = held_out(spec)
    key = ("measure", model_key, tuple(h["forget"]), tuple(h["retain"]), tuple(spec.terms()), forget)
    return _once(_results, key, lambda: measure(pipe, classifier, spec, SEED, forget))


def _attack(model_key, pipe, original, classifier, lr: float | None = None) -> dict:
    return _once(_results, ("attack", model_key, lr),
                 lambda: attack(pipe, original, classifier, parse_concept(ATTACK_CONCEPT), SEED, lr))


# ---------------------------------------------------------------- fast: the prompts really are held out

@pytest.mark.parametrize("concept", ["red", "red+circle", "red|circle", ATTACK_CONCEPT])
def test_held_out_prompts_are_outside_training(concept):
    spec = parse_concept(concept)
    train = training_prompts(spec)
    seen = set(train.forget) | set(train.anchors) | set(train.retain)
    h = held_out(spec)
    assert h["forget"] and h["retain"]
    assert not seen & (set(h["forget"]) | set(h["retain"]))
    # held-out templates only, and half the forget prompts name the concept by a synonym
    assert all(any(p.startswith(vocab.TEMPLATES[t].format("")) for t in HELD_OUT) for p in h["forget"] + h["retain"])
    syns = {vocab.ATTRIBUTES[vocab.meaning(t).attribute][t][0] for t in spec.terms()}
    assert sum(all(s in p.split() for s in syns) for p in h["forget"]) == len(h["forget"]) // 2
    assert all(shows(spec, a) for a in h["forget_attrs"]) and not any(shows(spec, a) for a in h["retain_attrs"])


def test_pair_concepts_train_on_the_same_prompts():
    """Why _model trains "red+circle" and "red|circle" once: the world gives them the same sets."""
    a, b = (training_prompts(parse_concept(c)) for c in ("red+circle", "red|circle"))
    assert (a.forget, a.anchors, a.retain) == (b.forget, b.anchors, b.retain)
    assert a.neighbors(parse_concept("red+circle")) == b.neighbors(parse_concept("red|circle"))


# ---------------------------------------------------------------- slow: unlearning on held-out prompts

@pytest.mark.slow
def test_red_is_forgotten_on_held_out_prompts_and_the_rest_kept(shapes_pipe, classifier):
    """Catches: the retain term dropped from the update (engine.py update(), `grads = g_f`):
    held-out retain accuracy falls to 0.830 of the original's at seed 0 (limit 0.90; unbroken 0.943)."""
    key, pipe = _model(shapes_pipe, "red")
    before = _measure("original", shapes_pipe, classifier, "red")
    after = _measure(key, pipe, classifier, "red")
    assert before["rate"] >= RED["orig_rate"], before
    assert after["rate"] <= RED["rate"], (before, after)
    assert after["retain"] >= RED["retain_ratio"] * before["retain"], (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("seed", DEFAULT_SEEDS)
def test_the_shipped_default_erases_red_on_held_out_prompts(shapes_pipe, classifier, seed):
    """TrustConfig() as shipped, on two training seeds: red is gone from the held-out prompts
    (UA <= 0.05 of 48 images, half naming it by its synonym) and the rest is kept."""
    pipe = _once(_models, ("default", "red", seed), lambda: unlearn_default(shapes_pipe, "red", seed))
    before = _measure("original", shapes_pipe, classifier, "red")
    after = measure(pipe, classifier, parse_concept("red"), SEED)
    assert after["rate"] <= DEFAULT["rate"], (seed, before, after)
    assert after["retain"] >= DEFAULT["retain_ratio"] * before["retain"], (seed, before, after)


@pytest.mark.slow
@pytest.mark.parametrize("concept", ["red+circle", "red|circle"])
def test_pair_is_forgotten_on_held_out_prompts_and_its_parts_kept(shapes_pipe, classifier, concept):
    """Red circles go; red non-circles stay red, other circles stay circles, and the forget
    prompts keep their circles (A is what the anchors replace).
    Catches: the retain term dropped (engine.py update(), `grads = g_f`): red non-circles lose
    their red (a_kept 1.00 -> 0.00 at seed 0) and retain accuracy falls 0.95 -> 0.73."""
    key, pipe = _model(shapes_pipe, concept)
    before = _measure("original", shapes_pipe, classifier, concept)
    after = _measure(key, pipe, classifier, concept)
    assert before["rate"] >= PAIR["orig_rate"], before
    assert after["rate"] <= PAIR["rate"], (before, after)
    assert after["retain"] >= PAIR["retain_ratio"] * before["retain"], (before, after)
    assert after["a_kept"] >= PAIR["kept_ratio"] * before["a_kept"], (before, after)
    assert after["b_kept"] >= PAIR["kept_ratio"] * before["b_kept"], (before, after)
    assert after["forget_b_kept"] >= PAIR["forget_b_kept"], after


@pytest.mark.slow
def test_partial_prompts_erase_the_pair_under_prompts_that_name_one_part(shapes_pipe, classifier):
    """A run without the partial prompts leaves red circles under "a red" / "a circle" (held-out
    templates and synonyms); with them (partial_prompts="on") those prompts draw red circles far
    less often, and red non-circles stay red, other circles stay circles (the pair's own prompts:
    see the note at PARTIAL).
    Catches: partial prompts trained on their own images (data.py Embeddings.images_of) or mapped
    onto the concept itself (world/concepts.py partial_prompts)."""
    spec = parse_concept("red+circle")
    key, plain = _model(shapes_pipe, "red+circle")
    part_key, part = _model(shapes_pipe, "red+circle", partial=True)
    before = _once(_results, ("partial", "original"), lambda: measure_partial(shapes_pipe, classifier, spec, SEED))
    without = _once(_results, ("partial", key), lambda: measure_partial(plain, classifier, spec, SEED))
    with_ = _once(_results, ("partial", part_key), lambda: measure_partial(part, classifier, spec, SEED))
    assert before["rate"] >= PARTIAL["orig_rate"], before
    assert with_["rate"] <= PARTIAL["rate"], (before, without, with_)
    assert without["rate"] - with_["rate"] >= PARTIAL["drop"], (without, with_)
    orig = _measure("original", shapes_pipe, classifier, "red+circle")
    after = _measure(part_key, part, classifier, "red+circle")
    assert after["a_kept"] >= PARTIAL["kept_ratio"] * orig["a_kept"], (orig, after)
    assert after["b_kept"] >= PARTIAL["kept_ratio"] * orig["b_kept"], (orig, after)


@pytest.mark.slow
def test_paraphrase_attack_reports_what_the_classifier_sees(shapes_pipe, classifier):
    """On the original model the paraphrases (synonyms, held-out templates) show red, and the
    attack's ASR agrees with the held-out forget rate measured here on other noise."""
    spec = parse_concept("red")
    r = paraphrase(shapes_pipe, classifier, spec, SEED)
    h = held_out(spec)
    assert sorted(r["prompts"]) == sorted(h["forget"])
    assert r["n"] == N_PARAPHRASE * len(h["forget"]) and r["hits"] == round(r["asr"] * r["n"])
    assert r["asr"] >= PARAPHRASE["orig_asr"], r
    mine = _measure("original", shapes_pipe, classifier, "red")
    assert abs(r["asr"] - mine["rate"]) <= PARAPHRASE["agreement"], (r["asr"], mine["rate"])


# ---------------------------------------------------------------- slow: the soft-prompt attack and the adversary

@pytest.mark.slow
def test_softprompt_attack_brings_the_concept_back(shapes_pipe, classifier):
    """On the unlearned, unprotected model the optimized prefix shows stripes far more often than
    the same procedure with lr 0 (the random starting prefix, same draws and noise).
    Catches: the attack's `opt.step()` removed (evaluation/attacks.py)."""
    key, pipe = _model(shapes_pipe, ATTACK_CONCEPT)
    attacked = _attack(key, pipe, shapes_pipe, classifier)
    unoptimized = _attack(key, pipe, shapes_pipe, classifier, lr=0.0)
    assert attacked["asr"] >= SOFTPROMPT["asr"], (attacked, unoptimized)
    assert attacked["asr"] - unoptimized["asr"] >= SOFTPROMPT["gain"], (attacked, unoptimized)


@pytest.mark.slow
def test_adversarial_training_lowers_the_attack(shapes_pipe, classifier):
    """TrustConfig(adv_prefix=5) makes the same attack succeed less often than on the model
    trained without it, and keeps held-out retain accuracy.
    Catches: the adversary disabled (engine.py step() never calls refresh_adversary())."""
    key, pipe = _model(shapes_pipe, ATTACK_CONCEPT)
    adv_key, adv_pipe = _model(shapes_pipe, ATTACK_CONCEPT, adv=True)
    unprotected = _attack(key, pipe, shapes_pipe, classifier)
    protected = _attack(adv_key, adv_pipe, shapes_pipe, classifier)
    assert unprotected["asr"] - protected["asr"] >= ADVERSARY["drop"], (unprotected, protected)
    before = _measure("original", shapes_pipe, classifier, ATTACK_CONCEPT, forget=False)
    after = _measure(adv_key, adv_pipe, classifier, ATTACK_CONCEPT, forget=False)
    assert after["retain"] >= ADVERSARY["retain_ratio"] * before["retain"], (before, after)
