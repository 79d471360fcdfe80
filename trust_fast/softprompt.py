"""Soft prompt prefixes: k free token embeddings placed before a prompt, inside the text encoder.

UnlearnDiffAtk-style attacks optimize such a prefix to bring an erased concept back
(:mod:`trust_fast.evaluation.attacks`); the engine's adversarial option (``TrustConfig.adv_prefix``)
optimizes one against the model being unlearned and trains on it, so the erasure also holds for the
prefixes an attacker would find.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor


@contextlib.contextmanager
def prefix_hook(text_encoder, prefix: Tensor):
    """While active, the token embeddings at positions 1..k of every input are replaced by
    `prefix` (k, D) (position 0 is the start token)."""
    k = prefix.shape[0]
    emb = text_encoder.get_input_embeddings()

    def hook(_module, _inputs, out):
        return torch.cat([out[:, :1], prefix.to(out.dtype).expand(out.shape[0], -1, -1), out[:, 1 + k:]], 1)

    handle = emb.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


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


__all__ = ["prefix_hook", "prefixed_ids", "encode_with_prefix", "random_prefix"]
