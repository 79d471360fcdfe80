"""Concept specs and prompt sets."""
import pytest

from trust_fast.concepts import ConceptSpec, parse_concept, read_prompt_file, user_prompts
from trust_fast.world.concepts import shows, world_prompts
from trust_fast.world import vocab


@pytest.mark.parametrize("spec,kind,a,b", [
    ("red", "single", "red", None),
    (" Crimson ", "single", "red", None),
    ("red+circle", "combination", "red", "circle"),
    ("red | disc", "conditional", "red", "circle"),
    ("striped+triangle", "combination", "striped", "triangle"),
])
def test_parse_valid(spec, kind, a, b):
    assert parse_concept(spec) == ConceptSpec(kind, a, b)


@pytest.mark.parametrize("spec,message", [
    ("", "empty"),
    ("   ", "empty"),
    ("red+", "malformed"),
    ("+red", "malformed"),
    ("red++circle", "malformed"),
    ("red|circle|square", "malformed"),
    ("red+blue", "both colors"),
    ("purple", "not a word of the shapes world"),
    ("red+hexagon", "not a word of the shapes world"),
])
def test_parse_invalid_names_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_concept(spec)


def test_free_text_terms_outside_the_world():
    assert parse_concept("van gogh", world=False) == ConceptSpec("single", "van gogh")
    assert parse_concept("child+wine", world=False).kind == "combination"


@pytest.mark.parametrize("spec", ["red", "circle", "striped", "red+circle", "red|circle", "blue|plain"])
def test_world_prompt_sets_are_consistent(spec):
    s = parse_concept(spec)
    ps = world_prompts(s)
    n_desc = 1
    for v in vocab.ATTRIBUTES.values():
        n_desc *= len(v)
    assert len(ps.forget) + len(ps.retain) == n_desc
    assert len(ps.anchors) == len(ps.forget) > 0
    assert all(shows(s, a) for a in ps.forget_attrs)
    assert not any(shows(s, a) for a in ps.retain_attrs)
    for prompt, anchor in zip(ps.forget, ps.anchors):
        assert prompt != anchor
        anchor_words = set(anchor.split())
        # the anchor drops the erased word; a conditional concept keeps its condition B
        assert not all(t in anchor_words for t in s.terms())
        if s.kind == "conditional":
            assert s.b in anchor_words and s.a not in anchor_words
    big = world_prompts(s, every_template=True)
    assert len(big.forget) == vocab.N_UNLEARN_TEMPLATES * len(ps.forget)


def test_paraphrase_prompts_use_synonyms_and_held_out_templates():
    s = parse_concept("red")
    held = range(vocab.N_UNLEARN_TEMPLATES, len(vocab.TEMPLATES))
    ps = world_prompts(s, templates=held, synonyms=True)
    assert all("crimson" in p and "red" not in p.split() for p in ps.forget)
    assert all(any(p.startswith(vocab.TEMPLATES[t].split("{}")[0]) for t in held) for p in ps.forget)


def test_user_prompts_and_errors(tmp_path):
    s = parse_concept("van gogh", world=False)
    ps = user_prompts(s, ["a painting by Van Gogh", "starry night, van gogh style"], ["a cat"])
    assert ps.anchors[0] == "a painting by"
    with pytest.raises(ValueError, match="absent"):
        user_prompts(s, ["a painting by Monet"])
    with pytest.raises(ValueError, match="empty"):
        user_prompts(s, ["  "])
    f = tmp_path / "p.txt"
    f.write_text("# comment\n\n")
    with pytest.raises(ValueError, match="is empty"):
        read_prompt_file(str(f), "forget prompts")
    with pytest.raises(ValueError, match="cannot read"):
        read_prompt_file(str(tmp_path / "missing.txt"), "forget prompts")
    f.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_prompt_file(str(f), "forget prompts")


def test_combination_anchor_replaces_the_first_term_and_keeps_the_second():
    ps = world_prompts(parse_concept("red+circle"))
    assert ps.forget and all("circle" in a and "red" not in a for a in ps.anchors)
    assert {a.split()[-2] for a in ps.anchors} <= {"green", "blue", "yellow"}
    # the order of the spec chooses: "circle+red" maps red circles to red squares / triangles
    ps = world_prompts(parse_concept("circle+red"))
    assert all("red" in a and "circle" not in a for a in ps.anchors)
    # the same forget/anchor pairs as the conditional spec, which must keep B anyway
    cond = world_prompts(parse_concept("red|circle"))
    assert list(zip(cond.forget, cond.anchors)) == list(zip(*(lambda q: (q.forget, q.anchors))(
        world_prompts(parse_concept("red+circle")))))
    s = parse_concept("van gogh+starry night", world=False)
    assert user_prompts(s, ["a van gogh painting of a starry night"]).anchors == ["a painting of a starry night"]


def test_neighbors_of_two_term_concepts():
    s = parse_concept("red+circle")
    ps = world_prompts(s)
    nb = ps.neighbors(s)
    # red squares/triangles (2 shapes x 2 textures) and non-red circles (3 colors x 2 textures)
    assert len(nb) == 10
    assert all(("red" in ps.retain[i]) != ("circle" in ps.retain[i]) for i in nb)
    assert world_prompts(parse_concept("red")).neighbors(parse_concept("red")) == []
    u = user_prompts(parse_concept("cat|hat", world=False), ["a cat in a hat"], ["a cat", "a hat", "a dog"])
    assert u.neighbors(parse_concept("cat|hat", world=False)) == [0, 1]


def test_partial_prompts_from_the_words_of_your_own_prompts():
    """PromptSet.with_partials: each forget prompt with one concept word and with both removed, and
    the empty prompt, each on the forget prompt's images and toward its anchor; never an entry that
    maps a prompt onto itself."""
    spec = parse_concept("red+circle", world=False)
    own = user_prompts(spec, ["a photo of a red circle"], ["a blue square"], anchor="a photo of a blue circle")
    ps = own.with_partials(spec)
    assert ps.forget == ["a photo of a red circle", "a photo of a circle", "a photo of a red", "a photo of a", ""]
    assert set(ps.anchors) == {"a photo of a blue circle"}
    assert ps.image_prompts("forget") == ["a photo of a red circle"] * 5
    assert ps.retain == own.retain and ps.image_prompts("retain") == own.retain
    # the default anchor is the prompt without A: "a photo of a circle" would map onto itself
    default = user_prompts(spec, ["a photo of a red circle"], ["a blue square"]).with_partials(spec)
    assert "a photo of a circle" not in default.forget[1:] and "a photo of a red" in default.forget
    assert all(f != a for f, a in zip(default.forget[1:], default.anchors[1:]))
    single = parse_concept("van gogh", world=False)
    ps = user_prompts(single, ["a painting by van gogh"]).with_partials(single)
    assert ps.forget == ["a painting by van gogh", ""]  # "a painting by" is the default anchor itself
    with pytest.raises(ValueError, match="2 forget sources for 1 forget prompts"):
        type(own)(["a"], ["b"], ["c"], forget_sources=["x", "y"]).image_prompts("forget")
