"""The shapes world's prompt space (trust_fast.world.concepts): the leak scan's prompts (every prompt
that could show a concept) and the partial prompts a run can add to its forget and retain sets."""
import pytest

from trust_fast.concepts import parse_concept
from trust_fast.world import vocab
from trust_fast.world.concepts import leak_prompts, partial_prompts, shows, world_prompts


def _contradicts(spec, attrs: dict) -> bool:
    return any(vocab.meaning(t).attribute in attrs and attrs[vocab.meaning(t).attribute] != t for t in spec.terms())


@pytest.mark.parametrize("concept", ["red", "circle", "striped", "red+circle", "red|circle", "blue+square"])
def test_leak_prompts_are_every_prompt_that_could_show_the_concept(concept):
    spec = parse_concept(concept)
    entries = leak_prompts(spec)
    texts = {p for p, _ in entries}
    # nothing that contradicts the concept; everything that does not, in every template and wording
    assert not [a for _, a in entries if _contradicts(spec, a)]
    for d in vocab.descriptions():
        if shows(spec, d):
            for t in range(len(vocab.TEMPLATES)):
                assert vocab.caption(d, t) in texts
    syn = {vocab.meaning(t).attribute: vocab.ATTRIBUTES[vocab.meaning(t).attribute][t][0] for t in spec.terms()}
    full = next(d for d in vocab.descriptions() if shows(spec, d))
    assert vocab.caption(full, 4, syn) in texts  # held-out template, synonyms
    # the prompts that leave a part out, with and without the noun, and the empty prompt
    assert {"a shape", "a", ""} <= texts
    for t in spec.terms():
        alone = {vocab.meaning(t).attribute: t}
        assert vocab.caption(alone, 0) in texts
        if "shape" not in alone:
            assert f"a {t}" in texts
    # the empty prompt gets as many images as one wording of a description
    assert sum(p == "" for p, _ in entries) == len(vocab.TEMPLATES)
    assert len(texts) == len(entries) - len(vocab.TEMPLATES) + 1


def test_leak_prompts_of_a_pair_leave_out_the_other_values_of_its_attributes():
    texts = {p for p, _ in leak_prompts(parse_concept("red+circle"))}
    assert "a red" in texts and "a striped red" in texts and "a circle" in texts and "a striped shape" in texts
    assert "a blue circle" not in texts and "a red square" not in texts and "a blue" not in texts


@pytest.mark.parametrize("concept", ["red+circle", "red|circle", "striped+triangle", "red"])
def test_partial_prompts_map_the_whole_concept_to_a_changed_part_and_keep_the_rest(concept):
    spec = parse_concept(concept)
    base = world_prompts(spec, every_template=True)
    full = world_prompts(spec, every_template=True, partial=True)
    n_f, n_r = len(base.forget), len(base.retain)
    assert full.forget[:n_f] == base.forget and full.retain[:n_r] == base.retain
    assert full.image_prompts("forget")[:n_f] == base.forget and full.image_prompts("retain")[:n_r] == base.retain
    added = list(zip(full.forget[n_f:], full.anchors[n_f:], full.image_prompts("forget")[n_f:],
                     full.forget_attrs[n_f:]))
    kept_only = [r for r in full.retain[n_r:] if r == ""]  # the empty prompt is kept, never erased
    assert added and kept_only and len(full.retain) - n_r == len(added) + len(kept_only)
    captions = {vocab.caption(d, t): d for d in vocab.descriptions() for t in range(len(vocab.TEMPLATES))}
    named = {vocab.meaning(t).attribute for t in spec.terms()}
    for text, anchor, source, attrs in added:
        # the partial prompt does not name every part of the concept; it trains on an image kind that shows it
        assert text not in captions or not named <= set(k for k, v in captions[text].items())
        assert shows(spec, captions[source]) and captions[source] == attrs
        # the anchor changes one named part and keeps the rest
        changed = {k for k in captions[source] if captions[source][k] != captions[anchor][k]}
        assert not shows(spec, captions[anchor]) and len(changed) == 1 and changed <= named
    for text, source, attrs in zip(full.retain[n_r:], full.image_prompts("retain")[n_r:], full.retain_attrs[n_r:]):
        assert not shows(spec, captions[source]) and captions[source] == attrs
    texts = set(full.forget[n_f:])
    assert "" not in texts and "a shape" in texts
    if spec.b is not None:
        assert "a red" in texts or "a striped" in texts
        # "a red" (A alone) goes to A with another B; "a circle" (B alone) to B with another A
        for text, anchor, _, attrs in added:
            kept = [t for t in spec.terms() if t in text.split()]
            if len(kept) == 1:
                assert kept[0] in anchor.split()


def test_partial_prompts_of_a_pair_hold_its_neighbours():
    spec = parse_concept("red+circle")
    full = world_prompts(spec, every_template=True, partial=True)
    base = world_prompts(spec, every_template=True)
    near = set(full.neighbors(spec))
    assert set(base.neighbors(spec)) <= near and len(near) > len(base.neighbors(spec))
    assert partial_prompts(spec, base).forget == full.forget
