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
    `replace` (before position embeddings are added); `replace` returns the same shape. Every
    embedding module holding the input-embedding table is hooked: T5's encoder looks tokens up in
    its own module that shares the table with ``get_input_embeddings()``."""
    table = text_encoder.get_input_embeddings()
    lookups = [m for m in text_encoder.modules() if isinstance(m, torch.nn.Embedding) and m.weight is table.weight]
    handles = [m.register_forward_hook(lambda _m, _i, out: replace(out)) for m in lookups or [table]]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def first_word(tokenizer) -> int:
    """Where a prompt's first word sits in its ids: 1 after a start token (CLIP), 0 without (T5)."""
    return int(tokenizer.bos_token_id is not None and
               tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id])


def placeholder_ids(tokenizer, prompt: str, word: str, max_length: int | None = None) -> tuple[Tensor, int]:
    """Token ids (1, L) of `prompt` with the first whole-word occurrence of `word` (any case) written as
    one placeholder token, and that token's position; without `word` in the prompt the placeholder
    goes first ("<v> prompt"). The placeholder's own id is the tokenizer's unknown token: an
    embedding hook replaces its embedding (the inversion attack's learned word). L: `max_length`
    (default the tokenizer's)."""
    found = re.search(rf"(?<!\w){re.escape(word.strip())}(?!\w)", prompt, flags=re.IGNORECASE) if word.strip() else None
    before, after = (prompt[:found.start()], prompt[found.end():]) if found else ("", prompt)
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids if text.strip() else []  # noqa: E731
    filler = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id
    length = max_length or tokenizer.model_max_length
    start = [tokenizer.bos_token_id] if first_word(tokenizer) else []
    head = encode(before)[:length - 2 - len(start)]
    body = head + [filler] + encode(after)
    ids = start + body[:length - 1 - len(start)] + [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return torch.tensor([ids + [pad] * (length - len(ids))]), len(start) + len(head)


# ------------------------------------------------------------------ every encoder of a family
# A soft token is one free embedding per text encoder of the pipeline's family (trust_fast.families:
# one CLIP for SD 1.x/2.x, two for SDXL, two CLIPs and T5 for SD3), stored as one float32 tensor
# (k, sum of the encoders' embedding widths), split per encoder when it is used.


def widths(family) -> list[int]:
    """The token-embedding width of each of the family's text encoders."""
    return [te.get_input_embeddings().weight.shape[1] for _, te, _ in family.prompt_encoders()]


def split(family, vectors: Tensor) -> list[Tensor]:
    """(..., sum of widths) -> one (..., width) piece per text encoder."""
    return list(vectors.split(widths(family), -1))


def random_prefix(family, k: int, generator: torch.Generator) -> Tensor:
    """k soft tokens (k, sum of widths), float32, detached, on the first text encoder's device: in
    every encoder the embeddings of k random vocabulary tokens (an attack's starting point)."""
    out = []
    for _, te, _ in family.prompt_encoders():
        table = te.get_input_embeddings().weight.detach()
        idx = torch.randint(table.shape[0], (k,), generator=generator, device=generator.device)
        out.append(table[idx.to(table.device)].float())
    return torch.cat([o.to(out[0].device) for o in out], -1)


def prefixed_ids(family, prompts: list[str], k: int) -> list[Tensor]:
    """Each encoder's token ids (N, L) of the prompts after k placeholder tokens (whose embeddings
    :func:`encode_with_prefix` replaces)."""
    placeholder = " ".join(["a"] * k)
    return family.tokenize([f"{placeholder} {p}" for p in prompts])


def encode_edited(family, ids: list[Tensor], edits: list[Callable[[Tensor], Tensor]]) -> Tensor:
    """The family's conditioning (N, L, D) of per-encoder token ids (:meth:`Family.tokenize`), with each
    encoder's input token embeddings passed through its edit; differentiable in what the edits use."""
    with contextlib.ExitStack() as stack:
        for (_, te, _), edit in zip(family.prompt_encoders(), edits):
            stack.enter_context(embedding_hook(te, edit))
        return family.encode_ids(ids)


def encode_with_prefix(family, ids: list[Tensor], prefix: Tensor) -> Tensor:
    """Conditioning of prefixed ids (:func:`prefixed_ids`) with soft tokens `prefix` (k, sum of widths)
    at the placeholders' positions, differentiable in `prefix`."""
    k = prefix.shape[0]

    def put(piece: Tensor, at: int) -> Callable[[Tensor], Tensor]:
        return lambda out: torch.cat([out[:, :at], piece.to(out).expand(out.shape[0], -1, -1), out[:, at + k:]], 1)

    return encode_edited(family, ids, [put(p, first_word(tok)) for p, (tok, _, _) in
                                       zip(split(family, prefix), family.prompt_encoders())])


def offsets_shape(family, n_prompts: int) -> tuple[int, int, int]:
    """(N, T, sum of widths): per-token offsets of N prompts for :func:`encode_with_offsets`, T
    covering every encoder's positions after its start token (:meth:`Family.tokenize` pads to each
    encoder's token count)."""
    return n_prompts, max(n - first_word(tok) for tok, _, n in family.prompt_encoders()), sum(widths(family))


def encode_with_offsets(family, ids: list[Tensor], offsets: Tensor) -> Tensor:
    """Conditioning of token ids (N, L per encoder) with `offsets` (N, T, sum of widths;
    :func:`offsets_shape`) added to every input token embedding after the start token: the
    embedding attack's search space around the prompts, differentiable in `offsets`."""
    def add(piece: Tensor, at: int) -> Callable[[Tensor], Tensor]:
        return lambda out: torch.cat([out[:, :at], out[:, at:] + piece[:, :out.shape[1] - at].to(out)], 1)

    return encode_edited(family, ids, [add(p, first_word(tok)) for p, (tok, _, _) in
                                       zip(split(family, offsets), family.prompt_encoders())])


def index_ids(ids: list[Tensor], i: Tensor | slice) -> list[Tensor]:
    """Rows `i` of every encoder's ids."""
    return [x[i.to(x.device) if isinstance(i, Tensor) else i] for x in ids]


def minimize(free: list[Tensor], loss_fn: Callable[[], Tensor], steps: int, optimizer: torch.optim.Optimizer,
             reduce: Callable[[list[Tensor]], None] | None = None) -> Tensor | None:
    """The one optimisation loop over free embeddings (a soft prefix, token offsets, whole prompts,
    a placeholder word), for the attacks and the engine's adversary alike: `steps` steps of
    `optimizer` (built over `free`), each on a fresh ``loss_fn()``. `reduce` may change the
    gradients in place first (the adversary averages them over data-parallel ranks). A step whose
    gradient is not finite is skipped, so one bad batch never poisons the embeddings. Returns the
    last loss (None for 0 steps)."""
    loss = None
    for _ in range(steps):
        loss = loss_fn()
        grads = list(torch.autograd.grad(loss, free))
        if reduce is not None:
            reduce(grads)
        if bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            for v, g in zip(free, grads):
                v.grad = g
            optimizer.step()
        for v in free:
            v.grad = None
    return loss


__all__ = ["minimize", "embedding_hook", "first_word", "placeholder_ids", "widths", "split", "random_prefix", "prefixed_ids",
           "encode_edited", "encode_with_prefix", "offsets_shape", "encode_with_offsets", "index_ids"]
