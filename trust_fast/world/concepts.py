"""Concepts in the built-in shapes world: its words, its prompt sets, and what an image shows.

The generic grammar and prompt containers are in :mod:`trust_fast.concepts`; this module adds what
only the world knows (its vocabulary, templates and attributes).
"""
from __future__ import annotations

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
                  synonyms: bool = False, every_template: bool = False) -> PromptSet:
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
    """
    if every_template:
        sets = [world_prompts(spec, [t], synonyms) for t in (templates if templates is not None
                                                               else range(vocab.N_UNLEARN_TEMPLATES))]
        return PromptSet(*(sum((getattr(s, f) for s in sets), []) for f in
                           ("forget", "anchors", "retain", "forget_attrs", "retain_attrs")))
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
    return PromptSet(forget, anchors, retain, f_attrs, r_attrs)


__all__ = ["canonical", "shows", "world_prompts"]
