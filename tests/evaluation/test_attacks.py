"""The optimized attacks' mechanics (what is free, where it goes, what stays unchanged) on tiny
models built from configs; what they achieve on the shipped world is in test_behaviour.py."""
from __future__ import annotations

import pytest
import torch

from trust_fast.concepts import parse_concept
from trust_fast.evaluation import attacks
from trust_fast.evaluation.attacks import parse_attacks
from trust_fast.softprompt import embedding_hook, placeholder_ids


def _ids(tok, prompt):
    return tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


@pytest.mark.parametrize("which", ["world", "sd"])
@pytest.mark.parametrize("prompt,word", [("a red circle", "red"), ("a large RED striped circle", "red"),
                                         ("a red circle", "circle"), ("red", "red")])
def test_placeholder_sits_where_the_word_was(request, which, prompt, word):
    """Writing the word's own token back at the placeholder gives exactly the tokenizer's ids."""
    tok = request.getfixturevalue({"world": "untrained_world", "sd": "tiny_sd"}[which]).tokenizer
    ids, pos = placeholder_ids(tok, prompt, word)
    word_ids = tok(word.lower(), add_special_tokens=False).input_ids
    if len(word_ids) != 1:
        pytest.skip(f"{word!r} is several tokens in this vocabulary")
    assert ids.shape == (1, tok.model_max_length)
    ids[0, pos] = word_ids[0]
    assert torch.equal(ids, _ids(tok, prompt.lower() if which == "world" else prompt))


def test_placeholder_goes_first_when_the_word_is_absent_or_only_inside_another(untrained_world):
    tok = untrained_world.tokenizer
    for prompt in ("a blue square", "a reddish square"):
        ids, pos = placeholder_ids(tok, prompt, "red")
        assert pos == 1
        assert torch.equal(torch.cat([ids[0, :1], ids[0, 2:]]), _ids(tok, prompt)[0, :-1])


def test_parse_attacks():
    assert parse_attacks("none") == [] and parse_attacks("") == []
    assert parse_attacks("all") == ["paraphrase", "softprompt", "embedding", "inversion"]
    assert parse_attacks("inversion, softprompt") == ["softprompt", "inversion"]  # a fixed order
    with pytest.raises(ValueError, match="unknown attack.*'fgsm'"):
        parse_attacks("softprompt,fgsm")


def _spy_conditioning(monkeypatch):
    """The prompt embeddings each attacked sampling call receives."""
    seen = []
    real = attacks.sample_from_noise

    def spy(pipe, noise, seed, steps, guidance, **kw):
        if "prompt_embeds" in kw:
            seen.append(kw["prompt_embeds"].detach().clone())
        return real(pipe, noise, seed, steps, guidance, **kw)

    monkeypatch.setattr(attacks, "sample_from_noise", spy)
    return seen


def _encode(pipe, prompt):
    with torch.no_grad():
        return pipe.text_encoder(_ids(pipe.tokenizer, prompt))[0]


def test_embedding_attack_starts_from_the_prompt_and_frees_every_token_after_the_start(tiny_sd, monkeypatch):
    prompts = ["a red circle", "a red square"]
    before = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    grads_before = [p.requires_grad for p in tiny_sd.text_encoder.parameters()]
    seen = _spy_conditioning(monkeypatch)
    kw = dict(n_images=2, n_per_prompt=2, steps=2, prompts=prompts)
    attacks.embedding_attack(tiny_sd, tiny_sd, None, None, attack_steps=1, lr=0.0, **kw)
    for cond, p in zip(seen, prompts):  # lr 0: the prompt's own embeddings, the same conditioning
        torch.testing.assert_close(cond, _encode(tiny_sd, p))
    seen.clear()
    captured = []
    real_encode = attacks.encode_edited

    def keep(family, ids, edits):
        captured.append(edits[0])
        return real_encode(family, ids, edits)

    monkeypatch.setattr(attacks, "encode_edited", keep)
    attacks.embedding_attack(tiny_sd, tiny_sd, None, None, attack_steps=3, lr=0.05, **kw)
    table = tiny_sd.text_encoder.get_input_embeddings()
    plain = table(_ids(tiny_sd.tokenizer, prompts[0])).detach()
    moved = captured[0](plain.clone()).detach()
    assert torch.equal(moved[0, 0], plain[0, 0])                    # the start token stays
    assert (moved[0, 1:] - plain[0, 1:]).abs().amax(-1).gt(0).all()  # every other position moved
    assert all(torch.equal(v, before[k]) for k, v in tiny_sd.unet.state_dict().items())  # the model did not
    assert [p.requires_grad for p in tiny_sd.text_encoder.parameters()] == grads_before  # restored
    assert len(table._forward_hooks) == 0


def test_inversion_learns_one_word_placed_at_the_concept_in_every_prompt(untrained_world, monkeypatch):
    """With the learned word started at "red"'s own embedding and lr 0, every attacked prompt is
    encoded exactly as the plain prompt: the word sits where "red" was (first when absent)."""
    world = untrained_world
    tok, te = world.tokenizer, world.text_encoder
    red = te.get_input_embeddings().weight[tok("red", add_special_tokens=False).input_ids[0]].detach()
    monkeypatch.setattr(attacks, "random_prefix", lambda family, k, g: red.clone().float().unsqueeze(0))
    seen = _spy_conditioning(monkeypatch)
    prompts = ["a red circle", "a large red striped square", "a blue circle"]
    r = attacks.inversion_attack(world, world, parse_concept("red"), None, attack_steps=1, lr=0.0, n_images=1,
                                 n_per_prompt=1, steps=2, prompts=prompts, batch_size=2)
    torch.testing.assert_close(seen[0], _encode(world, prompts[0]))
    torch.testing.assert_close(seen[1], _encode(world, prompts[1]))
    torch.testing.assert_close(seen[2], _encode(world, "red a blue circle"))
    assert r["inversion"]["word"] == "red" and r["inversion_n"] == 3
    # trained: one shared vector replaces the word in each prompt, nothing else moves
    seen.clear()
    attacks.inversion_attack(world, world, parse_concept("red"), None, attack_steps=3, lr=0.1, n_images=1,
                             n_per_prompt=1, steps=2, prompts=prompts[:2], batch_size=2)
    assert not torch.allclose(seen[0], _encode(world, prompts[0]))
    assert len(te.get_input_embeddings()._forward_hooks) == 0


def test_embedding_hook_is_removed_on_error(untrained_world):
    te = untrained_world.text_encoder
    with pytest.raises(RuntimeError):
        with embedding_hook(te, lambda out: out * 0):
            raise RuntimeError("boom")
    assert len(te.get_input_embeddings()._forward_hooks) == 0


@pytest.mark.parametrize("call,message", [
    (lambda p: attacks.embedding_attack(p, p, None, None, prompts=["x"], attack_steps=0), "attack_steps=0"),
    (lambda p: attacks.inversion_attack(p, p, None, None, prompts=["x"], batch_size=0), "batch_size=0"),
    (lambda p: attacks.inversion_attack(p, p, None, None), "needs its prompts"),
])
def test_attacks_refuse_bad_arguments_in_one_line(untrained_world, call, message):
    with pytest.raises(ValueError, match=message) as e:
        call(untrained_world)
    assert "\n" not in str(e.value)
