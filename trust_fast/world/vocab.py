"""The shapes world's vocabulary: attributes, their values, synonyms and caption templates.

Every word of the world is one token of the shipped tokenizer, so a concept is one
embedding and synonyms are separate embeddings the model learned to treat alike.
"""
from __future__ import annotations

from dataclasses import dataclass

# attribute -> value -> synonyms (the value itself is the canonical word)
ATTRIBUTES: dict[str, dict[str, tuple[str, ...]]] = {
    "color": {
        "red": ("crimson", "scarlet"),
        "green": ("emerald",),
        "blue": ("azure",),
        "yellow": ("golden",),
    },
    "shape": {
        "circle": ("disc",),
        "square": ("block",),
        "triangle": ("wedge",),
    },
    "texture": {
        "plain": ("solid",),
        "striped": ("lined",),
    },
}
ATTRIBUTE_ORDER: tuple[str, ...] = ("texture", "color", "shape")  # word order in a caption

# Templates 0..2 are the ones unlearning trains on; 3..4 are held out for paraphrase attacks.
TEMPLATES: tuple[str, ...] = (
    "a {}",
    "a picture of a {}",
    "an image of a {}",
    "a drawing of a {}",
    "a photo of a {}",
)
N_UNLEARN_TEMPLATES = 3


@dataclass(frozen=True)
class WordMeaning:
    attribute: str
    value: str
    canonical: bool


def _build_lexicon() -> dict[str, WordMeaning]:
    lex: dict[str, WordMeaning] = {}
    for attr, values in ATTRIBUTES.items():
        for value, syns in values.items():
            lex[value] = WordMeaning(attr, value, True)
            for s in syns:
                lex[s] = WordMeaning(attr, value, False)
    return lex


LEXICON: dict[str, WordMeaning] = _build_lexicon()


def values(attribute: str) -> list[str]:
    return list(ATTRIBUTES[attribute])


def index_of(attribute: str, value: str) -> int:
    return values(attribute).index(value)


def meaning(word: str) -> WordMeaning:
    """The attribute and canonical value a world word names; ValueError for an unknown word."""
    try:
        return LEXICON[word.lower()]
    except KeyError:
        known = ", ".join(sorted(v for v in LEXICON if LEXICON[v].canonical))
        raise ValueError(f"{word!r} is not a word of the shapes world (known: {known}, and synonyms)") from None


def describe(attrs: dict[str, str], synonyms: dict[str, str] | None = None) -> str:
    """Noun phrase for the given attribute values, e.g. {"color": "red", "shape": "circle"} -> "red circle".

    `synonyms` maps an attribute to the word used in place of its canonical value.
    A phrase without a shape gets the generic noun "shape".
    """
    words = []
    for attr in ATTRIBUTE_ORDER:
        if attr in attrs:
            words.append((synonyms or {}).get(attr, attrs[attr]))
    if "shape" not in attrs:
        words.append("shape")
    return " ".join(words)


def phrases(attrs: dict[str, str], synonyms: dict[str, str] | None = None) -> list[str]:
    """The noun phrases a prompt may use for `attrs`: describe()'s, and without a shape also the bare
    adjectives ({"color": "red"} -> ["red shape", "red"]; {} -> ["shape", ""])."""
    phrase = describe(attrs, synonyms)
    return [phrase] if "shape" in attrs else [phrase, phrase[:-len("shape")].strip()]


def descriptions() -> list[dict[str, str]]:
    """Every fully described image kind: one dict attribute -> value per combination, fixed order."""
    import itertools

    names = list(ATTRIBUTES)
    return [dict(zip(names, combo)) for combo in itertools.product(*(values(a) for a in names))]


def caption(attrs: dict[str, str], template: int = 0, synonyms: dict[str, str] | None = None) -> str:
    return TEMPLATES[template].format(describe(attrs, synonyms))


def all_words() -> list[str]:
    """Every word any caption of the world can contain, in a fixed order."""
    words: list[str] = []
    for t in TEMPLATES:
        for w in t.replace("{}", " ").split():
            if w not in words:
                words.append(w)
    for w in list(LEXICON) + ["shape"]:
        if w not in words:
            words.append(w)
    return words
