"""Free token embeddings inside the text encoder: soft prefixes, whole prompts, placeholder words.

UnlearnDiffAtk-style attacks optimize a soft prefix (k free embeddings before a prompt) to bring an
erased concept back, the embedding attack optimizes every token of the prompt, and the inversion
attack one placeholder word (:mod:`trust_fast.evaluation.attacks`); the engine's adversarial option
(``TrustConfig.adv_prefix``) optimizes a prefix against the model being unlearned and trains on it,
so the erasure also holds for the prefixes an attacker would find.
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable

import torch
from torch import Tensor


@contextlib.contextmanager
def embedding_hook(text_encoder, replace: Callable[[Tensor], Tensor]):
    """While active, the token embeddings (N, L, D) the text encoder looks up are passed through
    `replace` (before position embeddings are added); `replace` returns the same shape."""
    handle = text_encoder.get_input_embeddings().register_forward_hook(lambda _m, _i, out: replace(out))
    try:
        yield
    finally:
        handle.remove()


def prefix_hook(text_encoder, prefix: Tensor):
    """While active, the token embeddings at positions 1..k of every input are replaced by
    `prefix` (k, D) (position 0 is the start token)."""
    k = prefix.shape[0]
    return embedding_hook(text_encoder, lambda out: torch.cat(
        [out[:, :1], prefix.to(out.dtype).expand(out.shape[0], -1, -1), out[:, 1 + k:]], 1))


def placeholder_ids(tokenizer, prompt: str, word: str) -> tuple[Tensor, int]:
    """Token ids (1, L) of `prompt` with the first whole-word occurrence of `word` (any case) written as
    one placeholder token, and that token's position; without `word` in the prompt the placeholder
    goes first ("<v> prompt"). The placeholder's own id is the tokenizer's unknown token: an
    embedding hook replaces its embedding (the inversion attack's learned word)."""
    found = re.search(rf"(?<!\w){re.escape(word.strip())}(?!\w)", prompt, flags=re.IGNORECASE) if word.strip() else None
    before, after = (prompt[:found.start()], prompt[found.end():]) if found else ("", prompt)
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids if text.strip() else []  # noqa: E731
    filler = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id
    length = tokenizer.model_max_length
    head = encode(before)[:length - 3]
    body = head + [filler] + encode(after)
    ids = [tokenizer.bos_token_id] + body[:length - 2] + [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return torch.tensor([ids + [pad] * (length - len(ids))]), 1 + len(head)


def prefixed_ids(tokenizer, prompts: list[str], k: int) -> Tensor:
    """Token ids (N, L) of the prompts after k placeholder tokens (whose embeddings the hook replaces)."""
    placeholder = " ".join(["a"] * k)
    return tokenizer([f"{placeholder} {p}" for p in prompts], padding="max_length",
                     max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


def encode_with_prefix(text_encoder, ids: Tensor, prefix: Tensor) -> Tensor:
    """Text-encoder hidden states (N, L, D) of prefixed ids, differentiable in `prefix`."""
    with prefix_hook(text_encoder, prefix):
        return text_encoder(ids.to(text_encoder.device))[0]


def random_prefix(text_encoder, k: int, generator: torch.Generator) -> Tensor:
    """k embeddings of random vocabulary tokens (float32, detached): an attack's starting point."""
    table = text_encoder.get_input_embeddings().weight.detach()
    idx = torch.randint(table.shape[0], (k,), generator=generator, device=generator.device)
    return table[idx.to(table.device)].clone().float()


__all__ = ["embedding_hook", "prefix_hook", "placeholder_ids", "prefixed_ids", "encode_with_prefix", "random_prefix"]
