"""README's command-line synopsis and the parser agree: every flag a command takes is in its
synopsis (or in MODEL OPTIONS when its line says so), and the synopsis shows no flag the parser
lacks. --help, --overwrite (described once, below the block) and --debug (global) are exempt."""
from __future__ import annotations

import argparse
import os
import re

from trust_fast.cli import build_parser
from helpers import REPO

README = os.path.join(REPO, "README.md")
EXEMPT = {"--help", "--overwrite", "--debug"}


def synopsis() -> dict[str, tuple[set[str], bool]]:
    """command -> (flags on its synopsis lines, whether it takes [MODEL OPTIONS]); 'MODEL' -> those."""
    text = open(README).read()
    block = text.split("## Command line", 1)[1].split("```", 2)[1]
    out: dict = {}
    cur = None
    for line in block.splitlines():
        m = re.match(r"trust-fast (world train|[a-z-]+)", line)
        if m:
            cur = m.group(1)
            out[cur] = (set(), False)
        elif line.startswith("MODEL OPTIONS"):
            cur = "MODEL"
            out[cur] = (set(), False)
        if cur:
            flags, model = out[cur]
            out[cur] = (flags | set(re.findall(r"--[a-z][a-z0-9-]*", line.split(":", 1)[-1] if cur == "MODEL"
                                                  else line)), model or "[MODEL OPTIONS]" in line)
    return out


def parser_flags() -> dict[str, set[str]]:
    def flags(p):
        return {o for a in p._actions if not isinstance(a, argparse._SubParsersAction)
                for o in a.option_strings if o.startswith("--")} - EXEMPT

    def sub(p):
        return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices

    out = {}
    for name, p in sub(build_parser()).items():
        if name == "world":
            out.update({f"world {w}": flags(q) for w, q in sub(p).items()})
        else:
            out[name] = flags(p)
    return out


def test_readme_synopsis_matches_the_parser():
    doc, have = synopsis(), parser_flags()
    model = doc.pop("MODEL")[0]
    assert model, "README lost its MODEL OPTIONS line"
    problems = []
    for name, flags in have.items():
        if name not in doc:
            if name.startswith("world ") and name != "world train":
                continue  # the world's other subcommands are described in prose below the block
            problems.append(f"{name}: no synopsis line")
            continue
        shown, takes_model = doc[name]
        allowed = shown | (model if takes_model else set())
        if flags - allowed:
            problems.append(f"{name}: parser flags missing from README: {sorted(flags - allowed)}")
        if shown - flags:
            problems.append(f"{name}: README shows flags the parser lacks: {sorted(shown - flags)}")
        if takes_model and not model <= flags:
            problems.append(f"{name}: says [MODEL OPTIONS] but lacks {sorted(model - flags)}")
    assert not problems, "\n".join(problems)
