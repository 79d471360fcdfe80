"""FLUX.1 (trust_fast.models.flux) on a tiny FluxPipeline built from configs: the adapter's hooks
against what FluxPipeline itself does (packing, conditioning, timesteps, distilled guidance), its
default targets and loading; then unlearning, evaluation, generation and patches through the CLI
on a saved tiny FLUX directory."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from helpers import moved_rows, small
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline
from trust_fast.cli import main
from trust_fast.models import family_for, load_pipeline, stored_dtype
from trust_fast.models.flux import calculate_shift, pack_latents, unpack_latents

FORGET = ["a red circle", "a red square", "red car"]
RETAIN = ["a blue square", "a green circle"]
SMALL = small(batch=2, min_row_updates=1)
# the CLI runs leave out the retain term (its batch, 32 images, is no CLI option), the Hessian term and
# the adversary (their double backward): each costs minutes of a CPU on a FLUX-sized attention (4608
# tokens); the direct tests keep the retain term
FAST = ["--steps", "2", "--x0-per-prompt", "1", "--x0-steps", "2", "--batch-size", "2", "--min-row-updates", "1",
        "--alpha", "0", "--hessian", "none", "--adv-prefix", "0"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline()


def _captured_calls(pipe, prompt: str, steps: int = 1, **kw) -> list[dict]:
    """The keyword arguments of every transformer call inside FluxPipeline.__call__."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
    try:
        pipe(prompt, num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0), **kw)
    finally:
        handle.remove()
    return seen


# ----------------------------------------------------------------------------- the adapter


def test_packing_round_trips_and_is_the_pipelines():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 8, 6)
    packed = pack_latents(x)
    assert packed.shape == (2, 4 * 3, 16)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), x)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 8 * 8, 6 * 8, 8), x)  # (pixels, vae scale factor 8)


def test_the_family_its_shapes_and_its_encoders(pipe):
    fam = family_for(pipe)
    assert fam.name == "flux" and fam.prediction_type == "flow"
    assert fam.denoiser is pipe.transformer and fam.denoiser_name == "transformer"
    assert fam.sample_shape() == (4, 128, 128)  # the pipeline's default 128 x 128 latents, unpacked
    assert [n for _, _, n in fam.prompt_encoders()] == [pipe.tokenizer.model_max_length, 512]
    cond = fam.encode(["a red circle", "a blue square"])
    assert cond.shape == (2, 512 + 1, 32)  # T5's 512 states, then the pooled CLIP embedding (16 wide) as one row
    assert fam.uncond().shape == (1, 513, 32)
    hidden, pooled = fam.unpack(cond)
    assert hidden.shape == (2, 512, 32) and pooled.shape == (2, 16)
    assert set(fam.pipeline_embeds(cond)) == {"prompt_embeds", "pooled_prompt_embeds"}


def test_conditioning_is_what_the_pipeline_itself_feeds_its_transformer(pipe):
    """Packed latents, timestep / 1000, the distilled guidance, T5 states, pooled CLIP, txt_ids and
    img_ids: the same tensors (and prediction) as FluxPipeline.__call__ at guidance 2."""
    fam = family_for(pipe)
    kw = _captured_calls(pipe, "a red circle", guidance_scale=2.0)[0]
    latents = fam.unpack_pipeline_latents(kw["hidden_states"])
    with fam.distilled_guidance(2.0):
        ours = fam.denoiser_inputs(latents, kw["timestep"] * 1000, fam.encode(["a red circle"]))
    assert fam.guidance == 3.5  # FluxPipeline's default, back after the block
    for k in ("hidden_states", "timestep", "guidance", "encoder_hidden_states", "pooled_projections", "txt_ids",
              "img_ids"):
        assert torch.equal(ours[k], kw[k]), k
    with torch.no_grad():
        theirs = pipe.transformer(**{**kw, "return_dict": True})
        assert torch.equal(fam.prediction(pipe.transformer(**ours), latents), unpack_latents(theirs.sample, 128, 128))


def test_the_prediction_is_shaped_like_the_latents_at_any_size(pipe):
    fam = family_for(pipe)
    x = torch.randn(3, 4, 8, 12)
    with torch.no_grad():
        out = pipe.transformer(**fam.denoiser_inputs(x, torch.tensor([0, 500, 999]), fam.encode(FORGET)))
    assert out.sample.shape == (3, 4 * 6, 16)
    assert fam.prediction(out, x).shape == x.shape


def test_set_timesteps_gives_the_pipelines_timesteps(pipe):
    """The resolution shift mu for 4096 image tokens and the sigmas 1 .. 1/steps, as the pipeline sets them."""
    fam = family_for(pipe)
    sched = fam.sampler()
    assert type(sched) is type(pipe.scheduler) and sched is not pipe.scheduler
    fam.set_timesteps(sched, 3, "cpu")
    seen = [kw["timestep"][0] * 1000 for kw in _captured_calls(pipe, "a red circle", steps=3)]
    torch.testing.assert_close(sched.timesteps, torch.stack(seen))
    assert calculate_shift(4096, pipe.scheduler.config) == pytest.approx(1.15)
    assert calculate_shift(256, pipe.scheduler.config) == pytest.approx(0.5)


def test_guided_prediction_is_one_conditional_pass_with_the_distilled_guidance(pipe):
    fam = family_for(pipe)
    x, cond, uncond = torch.randn(2, 4, 8, 8), fam.encode(FORGET[:2]), fam.uncond()
    calls = []

    def pred_fn(noisy, t, c):
        inputs = fam.denoiser_inputs(noisy, t, c)
        calls.append((noisy.shape[0], t.clone(), inputs["guidance"].clone()))
        with torch.no_grad():
            return fam.prediction(pipe.transformer(**inputs), noisy)

    out = fam.guided_prediction(pred_fn, x, torch.tensor(700.0), cond, uncond, 5.0)
    assert out.shape == x.shape and len(calls) == 1
    n, t, guidance = calls[0]
    assert n == 2 and torch.equal(t, torch.tensor([700.0, 700.0])) and torch.equal(guidance, torch.full((2,), 5.0))
    assert fam.guidance == 3.5


def test_the_base_family_guides_with_two_halves():
    """Classifier-free guidance of SD (the base hook): one pass over [x, x] with [uncond, cond]."""
    fam = family_for(tiny_sd_pipeline())
    x, cond, uncond = torch.randn(2, 4, 8, 8), fam.encode(FORGET[:2]), fam.uncond()
    calls = []

    def pred_fn(noisy, t, c):
        calls.append((noisy, t, c))
        return torch.where(torch.arange(noisy.shape[0]).view(-1, 1, 1, 1) < 2, noisy, 3 * noisy)  # e_u = x, e_c = 3x

    out = fam.guided_prediction(pred_fn, x, torch.tensor(400), cond, uncond, 2.0)
    noisy, t, c = calls[0]
    assert len(calls) == 1 and torch.equal(noisy, torch.cat([x, x])) and torch.equal(t, torch.full((4,), 400))
    assert torch.equal(c, torch.cat([uncond.expand(2, -1, -1), cond]))
    torch.testing.assert_close(out, x + 2.0 * (3 * x - x))


def test_schnell_has_no_guidance_input():
    pipe = tiny_flux_pipeline(guidance_embeds=False)
    fam = family_for(pipe)
    x = torch.randn(1, 4, 4, 4)
    inputs = fam.denoiser_inputs(x, torch.tensor([10]), fam.encode(["a red circle"]))
    assert inputs["guidance"] is None
    with torch.no_grad():
        assert fam.prediction(pipe.transformer(**inputs), x).shape == x.shape


def test_pipeline_latents_are_packed_and_unpacked_at_the_default_size(pipe):
    """Noise of sample_shape() packed for ``latents=`` gives what the pipeline samples from the same
    seed itself; its latent output unpacks to sample_shape()."""
    fam = family_for(pipe)
    noise = torch.randn(1, *fam.sample_shape(), generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0))
    own = pipe("a red circle", **kw).images
    given = pipe("a red circle", latents=fam.pack_pipeline_latents(noise), **kw).images
    assert torch.equal(own, given)
    assert fam.unpack_pipeline_latents(own).shape == (1, *fam.sample_shape())
    assert torch.equal(fam.pack_pipeline_latents(fam.unpack_pipeline_latents(own)), own)


def test_default_and_cross_attention_targets(pipe):
    from trust_fast.localize import find_targets

    fam = family_for(pipe)
    default = {t.name for t in find_targets(pipe.transformer, fam.expand_targets(None))}
    assert default == {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_q_proj",
                       "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_v_proj",
                       "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
                       "single_transformer_blocks.0.attn.to_q"}
    cross = {t.name for t in find_targets(pipe.transformer, fam.expand_targets(("@cross_attention",)))}
    assert {"transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_add_out",
            "single_transformer_blocks.0.attn.to_v"} <= cross
    assert all(".attn." in n and "norm" not in n for n in cross)  # the linear projections, not the RMS norms


def test_a_saved_flux_pipeline_loads(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "flux")
    assert stored_dtype(str(tmp_path / "flux")) == torch.float32  # read from transformer/
    loaded = load_pipeline(str(tmp_path / "flux"), "cpu")
    assert type(loaded).__name__ == "FluxPipeline" and family_for(loaded).name == "flux"
    assert torch.equal(family_for(loaded).encode(FORGET), family_for(pipe).encode(FORGET))


def _unlearner(pipe, **config):
    from trust_fast import TrustConfig, TrustUnlearner
    from trust_fast.concepts import parse_concept, user_prompts

    spec = parse_concept("red", world=False)
    prompts = user_prompts(spec, FORGET[:2], RETAIN)
    return TrustUnlearner(pipe, spec, TrustConfig(**{**SMALL, **config}), prompts=prompts)


def test_flux_unlearning_edits_only_selected_rows_of_its_default_targets(pipe):
    """TRUST's localized update on FLUX (without the Hessian term and the adversary, whose double
    backward through 4608 tokens of attention takes a minute on a CPU: see the slow test below)."""
    pipe = copy.deepcopy(pipe)
    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    u = _unlearner(pipe, hessian="none", adv_prefix=0)
    assert u.target_patterns == family_for(pipe).default_targets
    assert u.pool_shapes()["forget"] == (2, 1, 4, 128, 128)  # data-free images: unpacked latents
    changed = set()
    for _ in range(2):
        s = u.step()
        assert torch.isfinite(torch.tensor(s["loss_forget"])) and 0 < s["selected_rows"] < u.total_rows
        changed |= {(t.name, r) for t, rows in zip(u.targets, u.selected_rows) for r in rows.tolist()}
    assert moved_rows(pipe.transformer, before, changed) > 0


@pytest.mark.slow
def test_trusts_default_config_runs_on_flux(pipe):
    """The diagonal Hessian term and the adversarial prefix (in CLIP and T5) on FLUX: one step."""
    u = _unlearner(copy.deepcopy(pipe))
    assert u.config.hessian == "diag" and u.config.adv_prefix == 5
    s = u.step()
    assert torch.isfinite(torch.tensor(s["loss_forget"])) and s["selected_rows"] > 0


# ----------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory, pipe):
    """A saved tiny FLUX model and its unlearned copy (2 steps through `trust-fast unlearn`, without
    its before/after report: 25 sampling steps of 4608 tokens, minutes of a CPU; `evaluate` below
    makes the same report in 2 steps): (directory, model dir, output dir)."""
    d = tmp_path_factory.mktemp("flux_cli")
    model, out = d / "model", d / "out"
    pipe.save_pretrained(model)
    (d / "f.txt").write_text("\n".join(FORGET))
    (d / "r.txt").write_text("\n".join(RETAIN))
    rc = main(["unlearn", "--model", str(model), "--concept", "red", "--forget-prompts", str(d / "f.txt"),
               "--retain-prompts", str(d / "r.txt"), *FAST, "--no-eval", "--out", str(out)])
    assert rc == 0
    return d, model, out


def test_flux_unlearn_through_the_cli_saves_a_flux_pipeline(flux_run):
    _, model, out = flux_run
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and "*attn.add_k_proj" in report["target_patterns"]
    new, old = load_pipeline(str(out), "cpu"), load_pipeline(str(model), "cpu")
    assert type(new).__name__ == "FluxPipeline"
    diffs = [n for (n, p), q in zip(new.transformer.named_parameters(), old.transformer.parameters())
             if not torch.equal(p, q)]
    assert diffs and all((".attn." in n or ".ff." in n) for n in diffs), diffs


def test_flux_evaluate_through_the_cli(flux_run, capsys):
    d, model, out = flux_run
    rc = main(["evaluate", "--model", str(out), "--reference", str(model), "--concept", "red",
               "--forget-prompts", str(d / "f.txt"), "--retain-prompts", str(d / "r.txt"), "--n-per-prompt", "2",
               "--steps", "2", "--out", str(d / "eval.json")])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((d / "eval.json").read_text())
    assert report["forget_change"] > 0 and report["retain_change"] >= 0


def test_flux_generate_through_the_cli(flux_run, capsys):
    from PIL import Image

    d, _, out = flux_run
    rc = main(["generate", "--model", str(out), "--prompt", "a red circle", "--n", "2", "--steps", "2",
               "--out", str(d / "images")])
    assert rc == 0, capsys.readouterr().err
    assert sorted(f for f in os.listdir(d / "images") if not f.startswith(".")) == ["000.png", "001.png", "grid.png"]
    assert Image.open(d / "images" / "000.png").size == (256, 256)  # 128 latents, a VAE of scale factor 2


def test_flux_patches_through_the_cli(flux_run, capsys):
    from safetensors import safe_open

    d, model, out = flux_run
    patch, rebuilt = d / "p.safetensors", d / "rebuilt"
    assert main(["export-patch", "--base", str(model), "--unlearned", str(out), "--out", str(patch)]) == 0, \
        capsys.readouterr().err
    with safe_open(str(patch), framework="pt") as f:
        changed = json.loads(f.metadata()["tensors"])
    assert changed and all(n.startswith("transformer.") for n in changed)
    assert main(["apply-patch", "--base", str(model), "--patch", str(patch), "--out", str(rebuilt)]) == 0, \
        capsys.readouterr().err
    want = load_pipeline(str(out), "cpu").transformer.state_dict()
    got = load_pipeline(str(rebuilt), "cpu").transformer.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in want.items())

