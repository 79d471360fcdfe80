"""Concepts in the built-in shapes world: its words, its prompt sets, and what an image shows.

The generic grammar and prompt containers are in :mod:`trust_fast.concepts`; this module adds what
only the world knows (its vocabulary, templates and attributes).
"""
from __future__ import annotations

import itertools

from ..concepts import ConceptSpec, PromptSet
from . import vocab


def canonical(spec: ConceptSpec, text: str | None = None) -> ConceptSpec:
    """`spec` with its terms checked against the world's vocabulary and written as their canonical
    values (synonyms mapped); ValueError if a word is unknown or both terms name one attribute."""
    text = str(spec) if text is None else text
    meanings = [vocab.meaning(t) for t in spec.terms()]
    if spec.b is not None and meanings[0].attribute == meanings[1].attribute:
        raise ValueError(f"concept spec {text!r}: {spec.a!r} and {spec.b!r} are both {meanings[0].attribute}s, "
                         "and one image shows only one; combine words of different attributes")
    return ConceptSpec(spec.kind, meanings[0].value, meanings[1].value if spec.b else None)


def shows(spec: ConceptSpec, attrs: dict[str, str]) -> bool:
    """Whether attributes (of a prompt, or predicted for an image) show the concept to be erased:
    A for a single concept, A and B together for a combination or a conditional concept."""
    return all(attrs.get(vocab.meaning(t).attribute) == t for t in spec.terms())


def world_prompts(spec: ConceptSpec, templates: range | list[int] | None = None,
                  synonyms: bool = False, every_template: bool = False, partial: bool = False) -> PromptSet:
    """Forget/anchor/retain prompts of the shapes world for a parsed spec.

    Each fully described image kind (texture, color, shape) is one prompt; templates rotate over
    the prompts (default: the unlearning templates). The anchor replaces A, the first term of the
    spec, by another value of its attribute, rotating through the alternatives, and keeps B: for
    "A|B" because B must survive, for "A+B" because replacing either term erases the pair and
    one fixed choice keeps the edit consistent ("red+circle" -> blue/green/yellow circles; write
    "circle+red" to map red circles to red squares and triangles instead). Measured on the
    built-in model (BENCHMARKS.md, "Engine"): replacing the color erases red circles fully
    (UA 0.000) with red non-circles at 0.95x, replacing the shape leaves UA 0.125, and
    alternating between the two costs red non-circles 12%.
    With `synonyms`, each prompt's concept words are written as their first synonym (paraphrases).
    With `every_template`, each description appears once per template instead (training sets).
    With `partial`, the prompts that name only part of the concept join the set (:func:`partial_prompts`),
    once, templates rotating.
    """
    if every_template:
        sets = [world_prompts(spec, [t], synonyms) for t in (templates if templates is not None
                                                               else range(vocab.N_UNLEARN_TEMPLATES))]
        out = PromptSet(*(sum((getattr(s, f) for s in sets), []) for f in
                          ("forget", "anchors", "retain", "forget_attrs", "retain_attrs")))
        return partial_prompts(spec, out, templates) if partial else out
    templates = list(templates if templates is not None else range(vocab.N_UNLEARN_TEMPLATES))
    forget, anchors, retain, f_attrs, r_attrs = [], [], [], [], []
    for d in vocab.descriptions():
        if shows(spec, d):
            k = len(forget)
            replaced = spec.a
            attr = vocab.meaning(replaced).attribute
            others = [v for v in vocab.values(attr) if v != replaced]
            anchor = dict(d, **{attr: others[k % len(others)]})
            tpl = templates[k % len(templates)]
            syn = {vocab.meaning(t).attribute: vocab.ATTRIBUTES[vocab.meaning(t).attribute][t][0]
                   for t in spec.terms()} if synonyms else None
            forget.append(vocab.caption(d, tpl, syn))
            anchors.append(vocab.caption(anchor, tpl))
            f_attrs.append(d)
        else:
            retain.append(vocab.caption(d, templates[len(retain) % len(templates)]))
            r_attrs.append(d)
    out = PromptSet(forget, anchors, retain, f_attrs, r_attrs)
    return partial_prompts(spec, out, templates) if partial else out


def _views(spec: ConceptSpec, d: dict[str, str]) -> list[dict[str, str]]:
    """The partial descriptions of `d`, an image kind showing the concept: every subset of its
    attributes that leaves out at least one of the concept's."""
    named = {vocab.meaning(t).attribute for t in spec.terms()}
    keys = [a for a in vocab.ATTRIBUTE_ORDER if a in d]
    subsets = itertools.chain.from_iterable(itertools.combinations(keys, r) for r in range(len(keys)))
    return [{a: d[a] for a in sub} for sub in subsets if not named <= set(sub)]


def _phrasings(view: dict[str, str], template: int) -> list[str]:
    """A partial description as prompts (vocab.phrases in `template`: "a red shape", "a red"); the
    description of nothing is "a shape" and the empty prompt."""
    texts = [vocab.TEMPLATES[template].format(p).strip() for p in vocab.phrases(view)]
    return texts if view else texts[:1] + [""]


def _other(d: dict[str, str], term: str, k: int) -> dict[str, str]:
    """`d` with the attribute `term` names set to another value, the k-th alternative (rotating)."""
    attr = vocab.meaning(term).attribute
    others = [v for v in vocab.values(attr) if v != term]
    return dict(d, **{attr: others[k % len(others)]})


def partial_prompts(spec: ConceptSpec, base: PromptSet, templates=None) -> PromptSet:
    """`base` with the prompts that name only part of the concept: what a model erased on `base`
    alone still draws ("a red" gave red circles 62% of the time after "red+circle" was erased).

    For each image kind showing the concept and each of its partial descriptions (:func:`_views`),
    in each phrasing, templates rotating:
    - forget: the partial prompt trains on images of the whole kind ("a red" on "a plain red
      circle"), mapped to the kind with one named part changed: the part the prompt leaves out when
      it names the other ("a red" -> "a plain red square": A with another B), else A ("a circle",
      "a plain shape", "" -> "a plain blue circle");
    - retain: the same partial prompt on images of that changed kind ("a red" on "a plain red
      square"), distilled toward the frozen model on that kind's prompt (the engine does so for every
      entry with an image source), so that "a red" keeps drawing red squares and triangles without
      its target pulling it back toward circles.
    The empty prompt is only kept, never erased: it is the unconditional half of classifier-free
    guidance, and moving it away from the concept moves every guided prediction toward it
    (measured on red+circle, seed 0: UA 0.010 -> 0.698 with "" among the forget prompts)."""
    templates = list(templates if templates is not None else range(vocab.N_UNLEARN_TEMPLATES))
    forget, anchors, sources, f_attrs = [], [], [], []
    retain, r_sources, r_attrs = [], [], []
    named = {vocab.meaning(t).attribute: t for t in spec.terms()}
    k = 0
    for d in vocab.descriptions():
        if not shows(spec, d):
            continue
        for view in _views(spec, d):
            kept = [t for a, t in named.items() if a in view]
            changed = [t for t in spec.terms() if t not in kept][0] if kept else spec.a
            tpl = templates[k % len(templates)]
            for text in _phrasings(view, tpl):
                target = _other(d, changed, k)
                if text:  # the empty prompt is the guidance's unconditional: kept only (below)
                    forget.append(text)
                    anchors.append(vocab.caption(target, tpl))
                    sources.append(vocab.caption(d, tpl))
                    f_attrs.append(d)
                retain.append(text)
                r_sources.append(vocab.caption(target, tpl))
                r_attrs.append(target)
                k += 1
    return PromptSet(base.forget + forget, base.anchors + anchors, base.retain + retain,
                     base.forget_attrs + f_attrs, base.retain_attrs + r_attrs,
                     base.image_prompts("forget") + sources, base.image_prompts("retain") + r_sources)


def leak_prompts(spec: ConceptSpec) -> list[tuple[str, dict[str, str]]]:
    """Every prompt of the world that could show `spec`, as (prompt, the attributes it names).

    A prompt could show the concept when no attribute it names contradicts it: each attribute the
    concept names is either left out or given the concept's value; the others are left out or given
    any value. Each such description appears in every template (held-out ones included) and with
    every synonym of the concept's words; a description without a shape is written both with the
    generic noun and as bare adjectives ("a red shape", "a red"). The empty prompt "" appears once
    per template, so it gets as many images as one wording of a description. "a red" (only A of
    "red+circle"), "a striped shape" and "" are all in it: the prompts that do not name every part
    of the concept."""
    named = {vocab.meaning(t).attribute: t for t in spec.terms()}
    choices = [[None] + ([named[a]] if a in named else vocab.values(a)) for a in vocab.ATTRIBUTE_ORDER]
    out: list[tuple[str, dict[str, str]]] = []
    for combo in itertools.product(*choices):
        attrs = {a: v for a, v in zip(vocab.ATTRIBUTE_ORDER, combo) if v is not None}
        words = [[(a, w) for w in (v, *vocab.ATTRIBUTES[a][v])] for a, v in attrs.items() if a in named]
        for wording in itertools.product(*words):
            # without a shape, the generic noun and the bare adjectives ("a red shape", "a red")
            out += [(t.format(p).strip(), attrs) for p in vocab.phrases(attrs, dict(wording)) for t in vocab.TEMPLATES]
    out += [("", {})] * len(vocab.TEMPLATES)
    return out


__all__ = ["canonical", "leak_prompts", "partial_prompts", "shows", "world_prompts"]
