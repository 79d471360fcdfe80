"""Model families (trust_fast.models): SD 1.x/2.x, SDXL, SD3, the registry and its target table, the
refusal of anything else, dtypes and weight variants, on tiny pipelines built from configs; and the
CLI and import surface around them (FLUX: tests/models/test_flux.py)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, moved_rows, small, tiny_config
from tiny_pipelines import tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline, tiny_unsupported_pipeline
from trust_fast import TrustConfig, TrustUnlearner
from trust_fast.cli import main
from trust_fast.concepts import parse_concept, user_prompts
from trust_fast.models import UnsupportedPipeline, family_for, load_pipeline

SMALL = small(batch=2, min_row_updates=1)
FORGET = ["a red circle", "a red square", "red car"]
RETAIN = ["a blue square", "a green circle"]
ROOT = REPO


def _prompts():
    spec = parse_concept("red", world=False)
    return spec, user_prompts(spec, FORGET, RETAIN)


def _captured_call(denoiser, pipe, prompt: str) -> tuple[tuple, dict]:
    """The positional and keyword arguments of the denoiser's first call inside the pipeline's own
    __call__ (guidance 1: one conditional call per step)."""
    seen = []
    handle = denoiser.register_forward_pre_hook(lambda m, a, kw: seen.append((a, kw)), with_kwargs=True)
    try:
        pipe(prompt, num_inference_steps=1, guidance_scale=1.0, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    return seen[0]


# ----------------------------------------------------------------------------- refusal


def test_an_unsupported_pipeline_is_refused_in_one_line_naming_it():
    spec, prompts = _prompts()
    with pytest.raises(UnsupportedPipeline) as e:
        TrustUnlearner(tiny_unsupported_pipeline(), spec, TrustConfig(**SMALL), prompts=prompts)
    msg = str(e.value)
    assert "\n" not in msg and "DDPMPipeline" in msg and "StableDiffusionXLPipeline" in msg


def test_the_cli_refuses_an_unsupported_pipeline_before_writing(tmp_path, capsys):
    model = tmp_path / "ddpm"
    tiny_unsupported_pipeline().save_pretrained(model)
    (tmp_path / "f.txt").write_text("a red circle\n")
    rc = main(["unlearn", "--model", str(model), "--concept", "red", "--forget-prompts", str(tmp_path / "f.txt"),
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is a DDPMPipeline, which trust_fast does not support" in err[0], err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- SDXL


def test_sdxl_conditioning_is_what_the_pipeline_itself_feeds_its_unet():
    """Packed prompt embedding + pooled embedding + time ids, unpacked for the UNet, give the same
    tensors (and prediction) as StableDiffusionXLPipeline.__call__ at its default size."""
    pipe = tiny_sdxl_pipeline()
    fam = family_for(pipe)
    assert fam.name == "sdxl" and len(fam.prompt_encoders()) == 2
    args, kw = _captured_call(pipe.unet, pipe, "a red circle")
    ours = fam.denoiser_kwargs(fam.encode(["a red circle"]))
    assert torch.equal(ours["encoder_hidden_states"], kw["encoder_hidden_states"])
    for k in ("text_embeds", "time_ids"):
        assert torch.equal(ours["added_cond_kwargs"][k], kw["added_cond_kwargs"][k].to(ours["added_cond_kwargs"][k])), k
    sample, t = args[0], args[1]
    with torch.no_grad():
        assert torch.equal(pipe.unet(**fam.denoiser_inputs(sample, t, fam.encode(["a red circle"]))).sample,
                           pipe.unet(*args, **{**kw, "return_dict": True}).sample)
    # the unconditional conditioning is the pipeline's zeros (force_zeros_for_empty_prompt)
    assert fam.uncond().abs().max() == 0 and fam.uncond().shape == fam.encode([""]).shape


def test_sdxl_unlearning_edits_only_selected_rows_of_the_unet():
    pipe = tiny_sdxl_pipeline()
    spec, prompts = _prompts()
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    te = [p.detach().clone() for p in [*pipe.text_encoder.parameters(), *pipe.text_encoder_2.parameters()]]
    u = TrustUnlearner(pipe, spec, TrustConfig(hessian="hvp", **SMALL), prompts=prompts)
    changed = set()
    for _ in range(3):
        s = u.step()
        assert torch.isfinite(torch.tensor(s["loss_forget"])) and 0 < s["selected_rows"] < u.total_rows
        for t, rows in zip(u.targets, u.selected_rows):
            changed |= {(t.name, r) for r in rows.tolist()}
    moved = 0
    for n, p in pipe.unet.named_parameters():
        diff = (p.detach() != before[n])
        if not diff.any():
            continue
        module = n.rsplit(".", 1)[0]
        rows = diff.reshape(diff.shape[0], -1).any(1).nonzero().flatten().tolist()
        assert {(module, r) for r in rows} <= changed, n
        moved += len(rows)
    assert moved > 0
    assert all(torch.equal(a, b) for a, b in
               zip(te, [*pipe.text_encoder.parameters(), *pipe.text_encoder_2.parameters()]))


@pytest.mark.parametrize("make", [tiny_sdxl_pipeline, lambda: tiny_sd3_pipeline(t5=True)], ids=["sdxl", "sd3+t5"])
def test_the_adversary_trains_against_a_prefix_in_every_text_encoder(make):
    """The default adversary on a multi-encoder family: one prefix spanning every encoder's width,
    moved by its refreshes; the forget prompts re-encoded behind it; the encoders unchanged."""
    from trust_fast.softprompt import widths

    pipe = make()
    spec, prompts = _prompts()
    fam = family_for(pipe)
    encoders = [te for _, te, _ in fam.prompt_encoders()]
    before = [p.detach().clone() for te in encoders for p in te.parameters()]
    u = TrustUnlearner(pipe, spec, TrustConfig(adv_steps=2, adv_interval=1, **SMALL), prompts=prompts)
    assert u.config.adv_prefix == 5  # on by default in every family
    u.step()
    start = u.adv_prefixes[0].clone()
    assert start.shape == (5, sum(widths(fam)))
    assert u.emb_forget_adv[0].shape == u.emb_forget.shape
    assert not torch.allclose(u.emb_forget_adv[0], u.emb_forget)
    for _ in range(2):
        s = u.step()
        assert torch.isfinite(torch.tensor(s["loss_forget"]))
    assert not torch.equal(u.adv_prefixes[0], start) and u.adv_refreshes == 3
    assert all(torch.equal(a, b) for a, b in zip(before, [p for te in encoders for p in te.parameters()]))


def _cli_unlearn(pipe, tmp_path):
    """Save `pipe`, unlearn "red" from it through the CLI (3 steps, prompt files, the classifier-free
    evaluation); returns (model dir, output dir, report)."""
    model = tmp_path / "model"
    pipe.save_pretrained(model)
    (tmp_path / "f.txt").write_text("\n".join(FORGET))
    (tmp_path / "r.txt").write_text("\n".join(RETAIN))
    out = tmp_path / "out"
    rc = main(["unlearn", "--model", str(model), "--concept", "red", "--forget-prompts", str(tmp_path / "f.txt"),
               "--retain-prompts", str(tmp_path / "r.txt"), "--steps", "3", "--x0-per-prompt", "1",
               "--x0-steps", "2", "--min-row-updates", "1", "--n-per-prompt", "1", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 3 and report["eval_vs_original"]["forget_change"] > 0
    return model, out, report


def test_sdxl_through_the_cli_saves_an_sdxl_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    model, out, _ = _cli_unlearn(tiny_sdxl_pipeline(), tmp_path)
    new = DiffusionPipeline.from_pretrained(out)
    old = DiffusionPipeline.from_pretrained(model)
    assert type(new).__name__ == "StableDiffusionXLPipeline"
    diffs = [n for (n, p), q in zip(new.unet.named_parameters(), old.unet.parameters()) if not torch.equal(p, q)]
    assert diffs and all(("attn2" in n or ".ff." in n) for n in diffs), diffs


# ----------------------------------------------------------------------------- SD3 (MMDiT, flow matching)


@pytest.mark.parametrize("t5", [False, True])
def test_sd3_conditioning_is_what_the_pipeline_itself_feeds_its_transformer(t5):
    pipe = tiny_sd3_pipeline(t5=t5)
    fam = family_for(pipe)
    assert fam.name == "sd3" and fam.prediction_type == "flow" and len(fam.prompt_encoders()) == 2 + t5
    _, kw = _captured_call(pipe.transformer, pipe, "a red circle")
    ours = fam.denoiser_inputs(kw["hidden_states"], kw["timestep"], fam.encode(["a red circle"]))
    for k in ("encoder_hidden_states", "pooled_projections"):
        assert torch.equal(ours[k], kw[k]), k
    with torch.no_grad():
        assert torch.equal(pipe.transformer(**ours).sample, pipe.transformer(**{**kw, "return_dict": True}).sample)


def test_flow_matching_noising_and_target_by_hand():
    from trust_fast import objectives

    x0, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 250, 999])
    s = torch.tensor([0.0, 0.25, 0.999]).view(-1, 1, 1, 1)
    torch.testing.assert_close(objectives.add_noise_flow(x0, noise, t, 1000), (1 - s) * x0 + s * noise)
    assert torch.equal(objectives.add_noise_flow(x0, noise, t, 1000)[0], x0[0])  # t = 0 is the clean image
    assert torch.equal(objectives.diffusion_target(x0, noise, t, None, "flow"), noise - x0)


def test_sd3_unlearning_edits_only_selected_rows_of_its_default_targets():
    pipe = tiny_sd3_pipeline()
    spec, prompts = _prompts()
    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    u = TrustUnlearner(pipe, spec, TrustConfig(**SMALL), prompts=prompts)
    assert u.target_patterns == family_for(pipe).default_targets
    assert {t.name.rsplit(".", 1)[-1] for t in u.targets} == {"to_q", "add_q_proj", "add_k_proj", "add_v_proj",
                                                              "proj", "2"}
    changed = set()
    for _ in range(3):
        s = u.step()
        assert torch.isfinite(torch.tensor(s["loss_forget"])) and 0 < s["selected_rows"] < 0.5 * u.total_rows
        changed |= {(t.name, r) for t, rows in zip(u.targets, u.selected_rows) for r in rows.tolist()}
    assert moved_rows(pipe.transformer, before, changed) > 0


def test_sd3_through_the_cli(tmp_path):
    _, out, report = _cli_unlearn(tiny_sd3_pipeline(), tmp_path)
    assert "*attn.add_k_proj" in report["target_patterns"]
    # diffusers' own from_pretrained cannot load an SD3 saved without T5; trust_fast's loader can
    new = load_pipeline(str(out), "cpu")
    assert type(new).__name__ == "StableDiffusion3Pipeline" and new.text_encoder_3 is None


def test_esd_trains_the_family_cross_attention_and_patches_carry_transformer_rows(tmp_path):
    """ESD's config names the family's cross-attention set: all of attn2 on a UNet, the joint
    attention on SD3 (which has no attn2). The unlearned SD3 model's patch holds transformer rows
    and rebuilds it bit for bit on its base."""
    from trust_fast.patch import apply_patch, export_patch

    esd = dict(method="esd", batch=None, batch_size=2)  # a fresh config for each unlearner
    spec, prompts = _prompts()
    sd = TrustUnlearner(tiny_sd_pipeline(), spec, tiny_config(**esd), prompts=prompts)
    assert sd.target_patterns == ("*attn2.*",) and all(".attn2." in t.name + "." for t in sd.targets)
    base = tiny_sd3_pipeline()
    pipe = copy.deepcopy(base)
    u = TrustUnlearner(pipe, spec, tiny_config(**esd), prompts=prompts)
    assert u.target_patterns == ("*.attn.*",)
    names = {t.name.rsplit(".", 1)[-1] for t in u.targets}
    assert {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"} <= names
    assert all(".attn." in t.name for t in u.targets)
    for _ in range(2):
        assert not u.step()["skipped"]
    stats = export_patch(base, pipe, str(tmp_path / "p.safetensors"))
    assert 0 < stats["changed_rows"] and 0 < stats["fraction_of_unet"] < 1  # of the transformer here
    from safetensors import safe_open
    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        changed = json.loads(f.metadata()["tensors"])
    assert changed and all(n.startswith("transformer.") and ".attn." in n for n in changed)
    rebuilt = apply_patch(copy.deepcopy(base), str(tmp_path / "p.safetensors"))
    for (n, a), b in zip(pipe.transformer.state_dict().items(), rebuilt.transformer.state_dict().values()):
        assert torch.equal(a, b), n


def test_an_unknown_target_set_is_refused_naming_the_sets():
    spec, prompts = _prompts()
    with pytest.raises(ValueError, match=r"unknown target set '@attention'; the sets are @cross_attention, @default"):
        TrustUnlearner(tiny_sd_pipeline(), spec, TrustConfig(targets=("@attention",), **SMALL), prompts=prompts)


# ----------------------------------------------------------------------------- SD 2.x


def test_sd2_v_prediction_with_an_euler_scheduler_trains_on_v_targets():
    from diffusers import EulerDiscreteScheduler

    from trust_fast import objectives

    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, prediction_type="v_prediction", timestep_spacing="leading",
                                   steps_offset=1)
    pipe = tiny_sd_pipeline(scheduler=sched)
    spec, prompts = _prompts()
    u = TrustUnlearner(pipe, spec, TrustConfig(**SMALL), prompts=prompts)
    assert u.family.name == "sd" and u.prediction_type == "v_prediction"
    for _ in range(2):
        assert torch.isfinite(torch.tensor(u.step()["loss_forget"]))
    # the retain target of a v-prediction model is v, not the noise
    x0 = u.pools["retain"][0, :1]
    noise = torch.randn_like(x0)
    t = torch.tensor([500])
    v = objectives.diffusion_target(x0, noise, t, u.alphas_cumprod, u.prediction_type)
    a = u.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(v, a.sqrt() * noise - (1 - a).sqrt() * x0)


# ----------------------------------------------------------------------------- dtypes and variants


def test_an_fp16_variant_loads_in_fp16_and_is_saved_as_an_fp16_variant(tmp_path, capsys):
    model = tmp_path / "sd16"
    tiny_sd_pipeline().to(torch.float16).save_pretrained(model, variant="fp16")
    with pytest.raises(ValueError, match="pass --variant"):
        load_pipeline(str(model), "cpu")
    pipe = load_pipeline(str(model), "cpu", variant="fp16")
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float16}
    assert load_pipeline(str(model), "cpu", dtype="float32", variant="fp16").unet.dtype == torch.float32
    (tmp_path / "f.txt").write_text("\n".join(FORGET))
    out = tmp_path / "out"
    rc = main(["unlearn", "--model", str(model), "--variant", "fp16", "--concept", "red", "--forget-prompts",
               str(tmp_path / "f.txt"), "--steps", "2", "--x0-per-prompt", "1", "--x0-steps", "2", "--no-eval",
               "--min-row-updates", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert sorted(os.listdir(out / "unet")) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    again = load_pipeline(str(out), "cpu", variant="fp16")
    assert {again.unet.dtype, again.vae.dtype, again.text_encoder.dtype} == {torch.float16}
    # the patch commands read the variant too, and rebuild the unlearned fp16 pipeline bit for bit
    patch, rebuilt = tmp_path / "p.safetensors", tmp_path / "rebuilt"
    assert main(["export-patch", "--base", str(model), "--unlearned", str(out), "--variant", "fp16",
                 "--out", str(patch)]) == 0, capsys.readouterr().err
    assert main(["apply-patch", "--base", str(model), "--patch", str(patch), "--variant", "fp16",
                 "--out", str(rebuilt)]) == 0, capsys.readouterr().err
    assert sorted(os.listdir(rebuilt / "unet")) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    rebuilt_unet = load_pipeline(str(rebuilt), "cpu", variant="fp16").unet.state_dict()
    assert all(torch.equal(v, rebuilt_unet[k]) for k, v in again.unet.state_dict().items())
    assert any(not torch.equal(v, p0) for v, p0 in zip(again.unet.state_dict().values(), pipe.unet.state_dict().values()))


# ----------------------------------------------------------------------------- CLI and import surface


def test_debug_is_accepted_after_the_subcommand(tmp_path, capsys):
    args = ["export-patch", "--base", "shapes", "--unlearned", str(tmp_path / "missing"), "--out", str(tmp_path / "p")]
    assert main(args) == 2 and "neither a built-in model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="neither a built-in model"):
        main(args + ["--debug"])


@pytest.mark.parametrize("command", ["export-patch", "apply-patch"])
def test_patch_commands_require_their_base(command, tmp_path, capsys):
    other = ["--unlearned", str(tmp_path)] if command == "export-patch" else ["--patch", str(tmp_path / "p")]
    with pytest.raises(SystemExit) as e:
        main([command, *other, "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "--base" in capsys.readouterr().err


def test_the_drop_in_pieces_are_public_and_import_is_light():
    code = ("import sys, trust_fast; heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules];"
            "from trust_fast import MaskedAdamW, row_saliency, select_rows, TrustUnlearner, load_pipeline;"
            "import trust_fast.optim, trust_fast.ops;"
            "assert MaskedAdamW is trust_fast.optim.MaskedAdamW and row_saliency is trust_fast.ops.row_saliency;"
            "assert set(trust_fast.__all__) <= set(dir(trust_fast)); print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"  # `import trust_fast` alone imports neither torch nor diffusers
    r = subprocess.run([sys.executable, "-c", "import sys; from trust_fast.cli import main\n"
                        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                        "assert 'torch' not in sys.modules, 'torch imported by --help'"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_own_loop_batches_without_forget_or_retain_examples():
    """The README's own-loop pattern with a batch that has no forget (or no retain) example: the
    losses are None, a step without forget examples is skipped, one without retain examples runs
    on the forget term alone."""
    pipe = tiny_sd_pipeline()
    spec, prompts = _prompts()
    u = TrustUnlearner(pipe, spec, TrustConfig(**SMALL), prompts=prompts)
    cond, anchor = u.emb_forget[:2], u.emb_anchor[:2]
    noisy, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    empty = noisy[:0], t[:0], cond[:0]
    assert u.forget_loss(*empty, anchor[:0]) is None and u.retain_loss(*empty) is None
    before = [p.detach().clone() for p in u.params]
    s = u.update(None, u.retain_loss(noisy, t, cond))
    assert s["skipped"] and s["loss_forget"] is None and u.skipped_steps == 1
    assert all(torch.equal(a, p) for a, p in zip(before, u.params))
    s = u.update(u.forget_loss(noisy, t, cond, anchor), None)
    assert not s["skipped"] and s["loss_retain"] is None and s["selected_rows"] > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, u.params))


def test_the_engine_knows_no_world_and_no_cli():
    """The engine, concepts, families and the algorithm's modules import neither the shapes world
    nor the CLI: a pipeline that knows its concepts (ShapesPipeline) offers parse_concept and
    concept_prompts, and the family adapters carry everything model-specific."""
    code = ("import sys; import trust_fast.engine, trust_fast.concepts, trust_fast.families, trust_fast.models,"
            " trust_fast.localize,"
            " trust_fast.hessian, trust_fast.optim, trust_fast.objectives, trust_fast.checkpoint;"
            "print(sorted(m for m in sys.modules if m.startswith(('trust_fast.world', 'trust_fast.cli'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


# ----------------------------------------------------------------------------- the registry


def test_family_for_asks_the_registered_families_in_order(monkeypatch):
    """A family registered after the built-in ones is asked after them; family_for returns the first
    that matches, and the refusal names every registered family's pipelines."""
    from trust_fast.models import Family, registry

    monkeypatch.setattr(registry, "_FAMILIES", list(registry._FAMILIES))
    pipe = tiny_unsupported_pipeline()
    with pytest.raises(UnsupportedPipeline):
        family_for(pipe)

    @registry.register_family
    class Unconditional(Family):
        name = "ddpm"
        supported = ("DDPMPipeline (a test's)",)
        pipeline_classes = ("DDPMPipeline",)

        @staticmethod
        def matches(pipe):
            return type(pipe).__name__ == "DDPMPipeline"

    assert registry.register_family(Unconditional) is Unconditional  # twice: still one place
    assert registry.registered()[-1] is Unconditional and registry.registered().count(Unconditional) == 1
    fam = family_for(pipe)
    assert isinstance(fam, Unconditional) and fam.denoiser is pipe.unet
    assert family_for(tiny_sd_pipeline()).name == "sd"  # the built-in families come first
    assert "DDPMPipeline (a test's)" in registry.supported() and "DDPMPipeline" in registry.supported_classes()
    with pytest.raises(TypeError, match="Family subclass"):
        registry.register_family(object)


def test_the_builtin_families_and_their_target_table():
    from trust_fast import families, models
    from trust_fast.models.targets import CROSS_ATTENTION_TARGETS, DEFAULT_TARGETS
    from trust_fast.localize import DEFAULT_TARGETS as UNET

    assert [f.name for f in models.registered()] == ["sd", "sdxl", "sd3", "flux"]
    for fam in models.registered():
        assert fam.default_targets == DEFAULT_TARGETS[fam.name], fam.name
        assert fam.cross_attention_targets == CROSS_ATTENTION_TARGETS[fam.name], fam.name
    assert DEFAULT_TARGETS["sd"] == DEFAULT_TARGETS["sdxl"] == UNET
    assert CROSS_ATTENTION_TARGETS["sd"] == ("*attn2.*",) and CROSS_ATTENTION_TARGETS["sd3"] == ("*.attn.*",)
    assert {f.denoiser_name for f in models.registered()} == {"unet", "transformer"}
    assert set(models.SUPPORTED_CLASSES) == {"StableDiffusionPipeline", "StableDiffusionXLPipeline",
                                             "StableDiffusion3Pipeline", "FluxPipeline", "ShapesPipeline"}
    # the old module re-exports the public names
    for name in ("family_for", "load_pipeline", "UnsupportedPipeline", "stored_dtype", "Family", "DTYPES",
                 "StableDiffusion", "StableDiffusionXL", "StableDiffusion3", "SUPPORTED_CLASSES"):
        assert getattr(families, name) is getattr(models, name), name
    assert families.FAMILIES == models.registered() and families.UNET_TARGETS == UNET
    assert "FluxPipeline" in families.SUPPORTED and families.SUPPORTED.startswith("StableDiffusionPipeline")


def test_every_family_names_its_denoiser_by_role():
    """The adapters reach the denoiser as ``family.denoiser``, the component ``denoiser_name``."""
    for make, name in ((tiny_sd_pipeline, "unet"), (tiny_sdxl_pipeline, "unet"), (tiny_sd3_pipeline, "transformer")):
        pipe = make()
        fam = family_for(pipe)
        assert fam.denoiser_name == name and fam.denoiser is getattr(pipe, name)
        x = torch.randn(2, *fam.sample_shape())
        with torch.no_grad():
            out = fam.denoiser(**fam.denoiser_inputs(x, torch.tensor([10, 900]), fam.encode(["a", "b"])))
        assert fam.prediction(out, x).shape == x.shape
        assert fam.pack_pipeline_latents(x) is x and fam.unpack_pipeline_latents(x) is x


def test_the_base_sampling_hooks_are_what_the_engine_did_before():
    """set_timesteps: the scheduler's own; guided_prediction: classifier-free guidance over [uncond, cond]."""
    pipe = tiny_sd3_pipeline()
    fam = family_for(pipe)
    a, b = fam.sampler(), fam.sampler()
    fam.set_timesteps(a, 3, "cpu")
    b.set_timesteps(3, device="cpu")
    assert torch.equal(a.timesteps, b.timesteps)
    x, cond, uncond = torch.randn(2, *fam.sample_shape()), fam.encode(["a red circle", "a blue square"]), fam.uncond()

    def pred_fn(noisy, t, c):
        with torch.no_grad():
            return fam.prediction(fam.denoiser(**fam.denoiser_inputs(noisy, t, c)), noisy)

    t = a.timesteps[0]
    e = pred_fn(torch.cat([x, x]), t.expand(4), torch.cat([uncond.expand(2, -1, -1), cond]))
    e_u, e_c = e.chunk(2)
    torch.testing.assert_close(fam.guided_prediction(pred_fn, x, t, cond, uncond, 4.0), e_u + 4.0 * (e_c - e_u))


def test_models_and_the_world_do_not_import_each_other():
    """The import circle families <-> world is gone: importing either leaves the other unimported
    (load_pipeline("shapes") imports the world when it runs)."""
    for mod, other in (("trust_fast.models", "trust_fast.world"), ("trust_fast.world", "trust_fast.models"),
                       ("trust_fast.world.pipeline", "trust_fast.models")):
        code = f"import sys, {mod}; print(sorted(m for m in sys.modules if m.startswith({other!r})))"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0 and r.stdout.strip() == "[]", (mod, r.stdout, r.stderr)
