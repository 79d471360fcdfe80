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
    For the world, `forget_attrs`/`retain_attrs` hold each prompt's ground-truth attributes."""

    forget: list[str]
    anchors: list[str]
    retain: list[str]
    forget_attrs: list[dict[str, str]] = field(default_factory=list)
    retain_attrs: list[dict[str, str]] = field(default_factory=list)

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
