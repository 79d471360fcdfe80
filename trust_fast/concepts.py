"""Concept specs and the prompt sets built from them, for any model.

Grammar: "A" (single concept), "A+B" (combination: erase A and B appearing together, keep each
alone), "A|B" (conditional: erase A whenever B is present, keep B). For a model of your own, A and
B are free text and the prompts come from you (files or lists: :func:`user_prompts`). The
built-in shapes world checks its words and builds its prompt sets itself
(:mod:`trust_fast.world.concepts`: ``world_prompts``, ``shows``); this module knows no world and
imports it only when ``parse_concept(..., world=True)`` asks it to check the words.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

KINDS = {"": "single", "+": "combination", "|": "conditional"}
_TERM = r"[A-Za-z][A-Za-z0-9 _'-]*"
_SPEC = re.compile(rf"^\s*({_TERM}?)\s*(?:([+|])\s*({_TERM}?))?\s*$")


@dataclass(frozen=True)
class ConceptSpec:
    """A parsed spec. `a`/`b` are terms as written (lower-cased, trimmed); `b` is None for singles."""

    kind: str
    a: str
    b: str | None = None

    def __str__(self) -> str:
        op = {"single": "", "combination": "+", "conditional": "|"}[self.kind]
        return self.a + (op + self.b if self.b else "")

    def terms(self) -> list[str]:
        return [self.a] + ([self.b] if self.b else [])


MAX_SPEC = 200        # characters of a concept spec
MAX_PROMPTS = 10_000  # lines of a prompt file: each is encoded, sampled and trained on
MAX_PROMPT = 1_000    # characters of one prompt


def short(text: str, limit: int = 60) -> str:
    """`text` quoted for an error message, cut to `limit` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def parse_concept(spec: str, world: bool = True) -> ConceptSpec:
    """Parse "A", "A+B" or "A|B". With `world`, both terms must be words of the shapes world naming
    different attributes (trust_fast.world.concepts.canonical). Raises ValueError naming the problem."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("concept spec is empty: expected 'A', 'A+B' or 'A|B'")
    if len(spec) > MAX_SPEC:
        raise ValueError(f"concept spec is {len(spec)} characters long ({short(spec)}); at most {MAX_SPEC}")
    m = _SPEC.match(spec)
    if not m or not m.group(1) or (m.group(2) and not m.group(3)):
        raise ValueError(f"malformed concept spec {spec!r}: expected 'A', 'A+B' (combination) or 'A|B' (conditional)")
    a, op, b = m.group(1).strip().lower(), m.group(2) or "", (m.group(3) or "").strip().lower() or None
    out = ConceptSpec(KINDS[op], a, b)
    if world:
        from .world.concepts import canonical

        out = canonical(out, spec)
    return out


@dataclass
class PromptSet:
    """Prompts for one unlearning job. `anchors[i]` is the anchor of `forget[i]`.
    For the world, `forget_attrs`/`retain_attrs` hold each prompt's ground-truth attributes.

    `forget_sources[i]` / `retain_sources[i]`, when given, name the prompt whose data-free images
    the entry trains on, where that is not the entry's own prompt: a partial prompt ("a red" for
    "red+circle") trains on images of the whole concept ("a plain red circle"), since its own images
    show the concept only part of the time. Empty lists: every entry trains on its own prompt's
    images."""

    forget: list[str]
    anchors: list[str]
    retain: list[str]
    forget_attrs: list[dict[str, str]] = field(default_factory=list)
    retain_attrs: list[dict[str, str]] = field(default_factory=list)
    forget_sources: list[str] = field(default_factory=list)
    retain_sources: list[str] = field(default_factory=list)

    def image_prompts(self, kind: str) -> list[str]:
        """The prompt whose images each `kind` ("forget" or "retain") entry trains on."""
        own, sources = getattr(self, kind), getattr(self, f"{kind}_sources")
        if sources and len(sources) != len(own):
            raise ValueError(f"{len(sources)} {kind} sources for {len(own)} {kind} prompts")
        return list(sources) if sources else list(own)

    def with_partials(self, spec: "ConceptSpec") -> "PromptSet":
        """This set with the prompts that name only part of the concept added to the forget side,
        derived from the words (for prompts of your own; the shapes world builds its own from
        attributes, trust_fast.world.concepts.world_prompts(partial=True)).

        For each forget prompt: the prompt with one concept word removed (for "A+B" and "A|B", each
        word in turn) and with every concept word removed, each training on the forget prompt's
        images toward its anchor; and the empty prompt once per distinct anchor. An entry whose
        prompt equals its anchor is left out: mapping a prompt onto itself erases nothing (the
        default anchor is the prompt without A, so "a circle" of "red+circle" needs an explicit
        anchor such as "a blue circle" to be erased)."""
        def without(text: str, words: list[str]) -> str:
            for w in words:
                text = re.sub(rf"\s*\b{re.escape(w)}\b", "", text, flags=re.I)
            return re.sub(r"\s+", " ", text).strip()

        terms = spec.terms()
        drops = [[t] for t in terms] + ([terms] if len(terms) > 1 else [])
        seen = set(zip(self.forget, self.anchors))
        forget, anchors, sources = list(self.forget), list(self.anchors), self.image_prompts("forget")
        for p, q, src in zip(self.forget, self.anchors, self.image_prompts("forget")):
            for words in drops + [None]:
                view = "" if words is None else without(p, words)
                if view.lower() != q.lower() and (view, q) not in seen:
                    seen.add((view, q))
                    forget.append(view)
                    anchors.append(q)
                    sources.append(src)
        return PromptSet(forget, anchors, list(self.retain), list(self.forget_attrs), list(self.retain_attrs),
                         sources, list(self.retain_sources))

    def neighbors(self, spec: "ConceptSpec") -> list[int]:
        """Indices of the retain prompts that share a term with a two-term spec ("A+B", "A|B"):
        A without B and B without A, the prompts an erasure of the pair most easily damages.
        Empty for a single concept. Uses the attributes where known, the words otherwise."""
        if spec.b is None:
            return []
        if self.retain_attrs:
            return [i for i, d in enumerate(self.retain_attrs) if any(t in d.values() for t in spec.terms())]
        words = [re.compile(rf"\b{re.escape(t)}\b", re.I) for t in spec.terms()]
        return [i for i, p in enumerate(self.retain) if any(w.search(p) for w in words)]


def user_prompts(spec: ConceptSpec, forget: list[str], retain: list[str] | None = None,
                 anchor: str | list[str] | None = None) -> PromptSet:
    """Prompt sets for a model outside the shapes world, from the user's prompts.

    Each forget prompt must mention every term of the spec (case-insensitive). Without an
    explicit anchor, a prompt's anchor is the prompt with the erased term (A) removed."""
    forget = [p.strip() for p in forget if p.strip()]
    if not forget:
        raise ValueError("forget prompts are empty: give at least one prompt that contains the concept")
    missing = [p for p in forget if not all(t in p.lower() for t in spec.terms())]
    if missing:
        raise ValueError(f"concept {str(spec)!r} is absent from forget prompt(s): "
                         f"[{', '.join(short(p) for p in missing[:3])}]")
    if anchor is None:
        anchors = [re.sub(rf"\s*\b{re.escape(spec.a)}\b", "", p, flags=re.I).strip() for p in forget]
    elif isinstance(anchor, str):
        anchors = [anchor] * len(forget)
    else:
        anchors = list(anchor)
        if len(anchors) != len(forget):
            raise ValueError(f"got {len(anchors)} anchors for {len(forget)} forget prompts")
    return PromptSet(forget, anchors, [p.strip() for p in (retain or []) if p.strip()])


def read_prompt_file(path: str, what: str) -> list[str]:
    """Non-empty lines of a prompts file; ValueError naming the file if unreadable or empty."""
    lines = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, ln in enumerate(f, 1):
                if not ln.strip() or ln.lstrip().startswith("#"):
                    continue
                if len(lines) == MAX_PROMPTS:
                    raise ValueError(f"{what} file {path!r} has more than {MAX_PROMPTS} prompts; split it "
                                     "or keep the ones that matter")
                if len(ln.strip()) > MAX_PROMPT:
                    raise ValueError(f"{what} file {path!r}, line {number}: a prompt of {len(ln.strip())} "
                                     f"characters; at most {MAX_PROMPT}")
                lines.append(ln.strip())
    except OSError as e:
        raise ValueError(f"cannot read {what} file {path!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} file {path!r} is not UTF-8 text") from None
    if not lines:
        raise ValueError(f"{what} file {path!r} is empty")
    return lines


def __getattr__(name: str):
    # the shapes world's helpers, once defined here; they live in trust_fast.world.concepts
    if name in ("world_prompts", "shows"):
        from .world import concepts

        return getattr(concepts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
