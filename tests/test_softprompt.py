"""Free token embeddings in every text encoder of a family (trust_fast.softprompt): the soft prefix
the adversary trains against and the attacks optimize, on the built-in world and on tiny SD, SDXL
and SD3 pipelines (SD3 with and without T5, whose tokenizer has no start token)."""
from __future__ import annotations

import pytest
import torch

from tiny_pipelines import tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline
from trust_fast.evaluation import attacks
from trust_fast.families import family_for
from trust_fast.softprompt import (encode_with_prefix, first_word, placeholder_ids, prefixed_ids, random_prefix, split,
                                   widths)


def _world():
    from trust_fast.world.train import build_untrained_pipeline

    return build_untrained_pipeline()


PIPES = {"world": _world, "sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "sd3": tiny_sd3_pipeline,
         "sd3+t5": lambda: tiny_sd3_pipeline(t5=True)}


@pytest.fixture(scope="module", params=list(PIPES))
def pipe(request):
    return PIPES[request.param]()


def _word_embeddings(fam, words: str) -> torch.Tensor:
    """(k, sum of widths): in every encoder, the embeddings of the tokens of `words`."""
    pieces, k = [], None
    for tok, te, _ in fam.prompt_encoders():
        ids = tok(words, add_special_tokens=False).input_ids
        assert k is None or len(ids) == k, "the words must be as many tokens in every encoder"
        k = len(ids)
        pieces.append(te.get_input_embeddings().weight[ids].detach().float())
    return torch.cat(pieces, -1)


def test_a_prefix_of_real_words_encodes_as_the_written_prompt(pipe):
    """The soft tokens sit exactly where the prompt's first words go, in every encoder: a prefix made
    of the embeddings of "blue square" gives the conditioning of "blue square a red circle"."""
    fam = family_for(pipe)
    prefix = _word_embeddings(fam, "blue square")
    assert prefix.shape == (2, sum(widths(fam)))
    ids = prefixed_ids(fam, ["a red circle", "a green square"], 2)
    got = encode_with_prefix(fam, ids, prefix)
    want = fam.encode(["blue square a red circle", "blue square a green square"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_prefix_gradient_reaches_every_encoder_and_nothing_else_moves(pipe):
    fam = family_for(pipe)
    encoders = [te for _, te, _ in fam.prompt_encoders()]
    before = [[p.detach().clone() for p in te.parameters()] for te in encoders]
    prefix = random_prefix(fam, 3, torch.Generator().manual_seed(0)).requires_grad_(True)
    cond = encode_with_prefix(fam, prefixed_ids(fam, ["a red circle"], 3), prefix)
    out = fam.denoiser(**fam.denoiser_inputs(torch.randn(1, *fam.sample_shape()), torch.tensor([500]), cond)).sample
    out.square().mean().backward()
    for piece in split(fam, prefix.grad):
        assert piece.abs().sum() > 0  # every encoder's share of the prefix is differentiated
    for te, old in zip(encoders, before):
        assert len(te.get_input_embeddings()._forward_hooks) == 0
        assert all(torch.equal(p, q) for p, q in zip(te.parameters(), old))


def test_random_prefix_draws_vocabulary_rows_of_each_encoder(pipe):
    fam = family_for(pipe)
    prefix = random_prefix(fam, 4, torch.Generator().manual_seed(1))
    for piece, (_, te, _) in zip(split(fam, prefix), fam.prompt_encoders()):
        table = te.get_input_embeddings().weight.detach().float()
        assert all((table == row).all(-1).any() for row in piece)


def test_the_placeholder_and_the_first_word_without_a_start_token():
    tok, _ = __import__("tiny_pipelines").tiny_t5()
    assert first_word(tok) == 0
    ids, pos = placeholder_ids(tok, "a red circle", "red", 8)
    assert pos == 1 and ids[0, pos] == tok.unk_token_id
    ids[0, pos] = tok("red", add_special_tokens=False).input_ids[0]
    assert ids[0].tolist() == tok("a red circle", padding="max_length", max_length=8).input_ids


@pytest.mark.parametrize("name", ["sdxl", "sd3+t5"])
def test_the_attacks_run_on_multi_encoder_families(name, monkeypatch):
    """All three optimized attacks on SDXL and SD3: at lr 0 each samples with the plain prompt's
    own conditioning (the embedding attack) or the written prompt's (the inversion attack, whose
    word starts at the concept word's embeddings); trained, they report their distance figures and
    leave both the denoiser and the text encoders as they were."""
    pipe = PIPES[name]()
    fam = family_for(pipe)
    state = {k: v.clone() for k, v in fam.denoiser.state_dict().items()}
    modules = [fam.denoiser, *(te for _, te, _ in fam.prompt_encoders())]
    grads = [p.requires_grad for m in modules for p in m.parameters()]
    seen = []
    real = attacks.sample_from_noise

    def spy(p, noise, seed, steps, guidance, **kw):
        seen.append({k: v.detach().clone() for k, v in kw.items() if k.endswith("prompt_embeds")})
        return real(p, noise, seed, steps, guidance, **kw)

    monkeypatch.setattr(attacks, "sample_from_noise", spy)
    prompts = ["a red circle", "a red square"]
    kw = dict(n_images=1, n_per_prompt=1, steps=2, prompts=prompts)
    attacks.embedding_attack(pipe, pipe, None, None, attack_steps=1, lr=0.0, **kw)
    pairs = [s for s in seen if s]  # the attacked samplings (the plain ones pass prompts)
    for got, p in zip(pairs, prompts):
        want = fam.pipeline_embeds(fam.encode([p]))
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k])
    red = _word_embeddings(fam, "red")
    monkeypatch.setattr(attacks, "random_prefix", lambda f, k, g: red.clone())
    seen.clear()
    attacks.inversion_attack(pipe, pipe, None, None, attack_steps=1, lr=0.0, word="red", batch_size=1, **kw)
    pairs = [s for s in seen if s]
    for got, p in zip(pairs, prompts):
        torch.testing.assert_close(got["prompt_embeds"], fam.pipeline_embeds(fam.encode([p]))["prompt_embeds"])
    monkeypatch.setattr(attacks, "random_prefix", random_prefix)
    for attack in (attacks.softprompt_attack, attacks.embedding_attack, attacks.inversion_attack):
        r = attack(pipe, pipe, None, None, attack_steps=2, **kw)
        name_ = attack.__name__.replace("_attack", "")
        assert r[f"{name_}_n"] == 2 and torch.isfinite(torch.tensor(r[f"{name_}_distance"]))
    assert all(torch.equal(v, state[k]) for k, v in fam.denoiser.state_dict().items())
    assert [p.requires_grad for m in modules for p in m.parameters()] == grads  # restored
