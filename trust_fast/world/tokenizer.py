"""A CLIP-format BPE tokenizer for the shapes world, built offline.

CLIPTokenizer needs a vocabulary and BPE merges. We learn the merges from the world's
word list (plain BPE training) so that every world word ends up as exactly one token,
then write vocab.json and merges.txt in CLIP's format.
"""
from __future__ import annotations

import json
import os
from collections import Counter

from .vocab import all_words

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
MODEL_MAX_LENGTH = 16


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE training until every word is a single symbol; ties broken by first occurrence."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for s in seqs:
            for pair in zip(s, s[1:]):
                counts[pair] += 1
        if not counts:
            return merges
        best = max(counts.items(), key=lambda kv: kv[1])[0]  # Counter keeps insertion order on ties
        merges.append(best)
        joined = best[0] + best[1]
        for k, s in enumerate(seqs):
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[k] = out


def write_tokenizer(directory: str) -> None:
    """Write a CLIPTokenizer (vocab.json, merges.txt, configs) for the world's words into `directory`."""
    from transformers import CLIPTokenizer

    merges = learn_merges(all_words())
    vocab: dict[str, int] = {}
    for tok in [c for c in CHARS] + [c + "</w>" for c in CHARS] + [a + b for a, b in merges] + [BOS, EOS]:
        vocab.setdefault(tok, len(vocab))
    os.makedirs(directory, exist_ok=True)
    vocab_path, merges_path = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vocab_path, "w") as f:
        json.dump(vocab, f)
    with open(merges_path, "w") as f:
        f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MODEL_MAX_LENGTH)
    tok.save_pretrained(directory)
