"""Evaluation without a classifier (models outside the shapes world): paired change against the
original model, CLIP-free Frechet distance, the soft-prompt attack's distance, grids, and what was
skipped. Tiny Stable Diffusion pipelines built from configs; nothing is downloaded."""
import json

import pytest
import torch

from trust_fast.cli import main
from trust_fast.evaluation import generic_report


def _original_and_edited(pipe, root):
    """`pipe` saved as root/original, then with its cross-attention keys perturbed as root/edited,
    and prompt files for both."""
    pipe.save_pretrained(root / "original")
    with torch.no_grad():
        for name, w in pipe.unet.named_parameters():
            if "attn2.to_k" in name:
                w.add_(0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
    pipe.save_pretrained(root / "edited")
    (root / "forget.txt").write_text("a red circle\na red square\n")
    (root / "retain.txt").write_text("a blue circle\na green square\n")
    return root


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory):
    """An original tiny SD pipeline and a copy whose cross-attention keys were perturbed."""
    from tiny_pipelines import tiny_sd_pipeline

    return _original_and_edited(tiny_sd_pipeline(), tmp_path_factory.mktemp("sd"))


def _evaluate(root, model, *extra):
    return main(["evaluate", "--model", str(root / model), "--reference", str(root / "original"), "--concept", "red",
                 "--forget-prompts", str(root / "forget.txt"), "--retain-prompts", str(root / "retain.txt"),
                 "--n-per-prompt", "2", "--steps", "2", *extra])


def test_an_unchanged_model_shows_no_change(sd_dirs, tmp_path):
    out = tmp_path / "r.json"
    assert _evaluate(sd_dirs, "original", "--out", str(out)) == 0
    r = json.loads(out.read_text())
    # the same weights from the same noise give the same images: exactly zero change
    assert r["forget_change"] == 0.0 and r["retain_change"] == 0.0
    assert r["noise_floor"] > 0 and r["fd"] == pytest.approx(r["fd_self"])
    assert r["space"] == "latent" and r["fd_features"] == "pooled-8x8" and r["fd_n"] == 4


@pytest.mark.slow
def test_cli_reports_change_attack_grids_and_what_it_skipped(sd_dirs, tmp_path, capsys):
    out, grids = tmp_path / "r.json", tmp_path / "grids"
    assert _evaluate(sd_dirs, "edited", "--attack", "all", "--softprompt-steps", "2", "--embedding-steps", "2",
                     "--inversion-steps", "2", "--grids", str(grids), "--out", str(out)) == 0
    r = json.loads(out.read_text())
    assert r["forget_change"] > 0 and r["retain_change"] > 0 and r["selectivity"] > 0
    assert r["softprompt_change"] > 0 and r["softprompt_n"] == 4 and len(r["softprompt"]["per_prompt"]) == 2
    assert "ua" not in r and "asr_softprompt" not in r
    for name in ("embedding", "inversion"):  # the stronger attacks report the same figures
        assert r[f"{name}_change"] > 0 and r[f"{name}_n"] == 4 and f"{name}_recovery" in r
        assert r[f"{name}_change_original"] >= 0 and f"asr_{name}" not in r
    assert r["embedding"]["steps"] == r["inversion"]["steps"] == 2 and r["inversion"]["word"] == "red"
    skipped = " ".join(r["skipped"])
    for what in ("ua", "retain_acc", "asr_paraphrase", "asr_softprompt", "asr_embedding", "asr_inversion"):
        assert what in skipped, what
    printed = capsys.readouterr().out
    assert "skipped: ua (needs a classifier; none judges these prompts)" in printed and "forget_change" in printed
    assert "inversion_recovery" in printed
    # the attack also ran on the original: the prefix alone moves an image this far
    assert r["softprompt_change_original"] > 0 and "softprompt_recovery" in r
    from PIL import Image

    for name in ("forget.png", "retain.png"):  # VAE-decoded RGB pictures, not 4-channel latents
        im = Image.open(grids / name)
        assert im.mode == "RGB" and im.height >= 2 * 16
    assert r["grids"] == ["forget.png", "retain.png"]


@pytest.mark.parametrize("drop,message", [
    ("--reference", "give --reference, the original model"),
    ("--forget-prompts", "give --forget-prompts"),
])
def test_cli_outside_the_world_needs_reference_and_prompts(sd_dirs, capsys, drop, message):
    args = ["evaluate", "--model", str(sd_dirs / "edited"), "--reference", str(sd_dirs / "original"),
            "--concept", "red", "--forget-prompts", str(sd_dirs / "forget.txt")]
    i = args.index(drop)
    del args[i:i + 2]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_generic_report_checks_its_arguments(sd_dirs):
    from trust_fast.world import load_pipeline

    pipe = load_pipeline(str(sd_dirs / "original"), device="cpu")
    with pytest.raises(ValueError, match="give the reference model"):
        generic_report(pipe, None, ["a red circle"], [])
    with pytest.raises(ValueError, match="forget prompts are empty"):
        generic_report(pipe, pipe, [], ["a blue circle"])
    with pytest.raises(ValueError, match="n_per_prompt must be >= 2"):
        generic_report(pipe, pipe, ["a red circle"], [], n_per_prompt=1)
    with pytest.raises(ValueError, match="unknown attack"):
        generic_report(pipe, pipe, ["a red circle"], [], attack="bogus")
    # no retain prompts: the forget side alone, and the report says what it could not measure
    r = generic_report(pipe, pipe, ["a red circle"], [], n_per_prompt=2, steps=2)
    assert r["forget_change"] == 0.0 and "retain_change" not in r
    assert any("no retain prompts" in s for s in r["skipped"])


def test_generate_decodes_latent_pipelines_to_rgb(sd_dirs, tmp_path):
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(sd_dirs / "original"), "--prompt", "a red circle", "--n", "2",
                 "--steps", "2", "--out", str(out)]) == 0
    from PIL import Image

    im = Image.open(out / "000.png")
    assert im.mode == "RGB" and im.size == (16, 16)  # the tiny VAE's image size, not the 8x8 latent


def test_cli_refuses_bad_arguments_before_loading_any_model(sd_dirs, tmp_path, capsys, monkeypatch):
    import trust_fast.world

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(trust_fast.world, "load_pipeline", no_loading)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _evaluate(sd_dirs, "edited", "--grids", str(blocker)) == 2
    assert "--grids" in capsys.readouterr().err and blocker.read_text() == "x"
    assert _evaluate(sd_dirs, "edited", "--steps", "0") == 2
    assert "--steps must be positive" in capsys.readouterr().err
    assert _evaluate(sd_dirs, "edited", "--inversion-steps", "0") == 2
    assert "--inversion-steps must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: one line naming the bad attack, exit 2
        _evaluate(sd_dirs, "edited", "--attack", "softprompt,fgsm")
    assert e.value.code == 2 and "unknown attack(s) 'fgsm'" in capsys.readouterr().err
    assert main(["evaluate", "--concept", "red", "--reference", "none", "--grids", str(tmp_path / "g")]) == 2
    assert "it needs a --reference" in capsys.readouterr().err and not (tmp_path / "g").exists()


def test_stochastic_sampler_noise_is_paired_too(sd_dirs):
    """An ancestral scheduler draws fresh noise every step: both models must draw the same."""
    from diffusers import EulerAncestralDiscreteScheduler

    from trust_fast.world import load_pipeline

    a = load_pipeline(str(sd_dirs / "original"), device="cpu")
    b = load_pipeline(str(sd_dirs / "original"), device="cpu")
    for p in (a, b):
        p.scheduler = EulerAncestralDiscreteScheduler.from_config(p.scheduler.config)
    torch.manual_seed(123)  # the global generator must not matter
    r = generic_report(a, b, ["a red circle"], ["a blue circle"], n_per_prompt=2, steps=3)
    assert r["forget_change"] == 0.0 and r["retain_change"] == 0.0 and r["noise_floor"] > 0


def test_the_attack_generates_from_the_noise_the_reference_is_sampled_from(sd_dirs, monkeypatch):
    """softprompt_change compares each attacked image with the original's image of the plain prompt
    from the same starting noise and the same sampler seed."""
    from trust_fast.evaluation import attacks, metrics
    from trust_fast.world import load_pipeline

    calls = []
    real = metrics.sample_from_noise

    def spy(pipe, noise, seed, steps, guidance, **kw):
        calls.append((pipe, noise.clone(), seed, "prompt_embeds" in kw))
        return real(pipe, noise, seed, steps, guidance, **kw)

    monkeypatch.setattr(metrics, "sample_from_noise", spy)
    monkeypatch.setattr(attacks, "sample_from_noise", spy)
    model = load_pipeline(str(sd_dirs / "edited"), device="cpu")
    original = load_pipeline(str(sd_dirs / "original"), device="cpu")
    r = attacks.softprompt_attack(model, original, None, None, attack_steps=1, n_per_prompt=2, steps=2,
                                  prompts=["a red circle", "a red square"])
    attacked = [c for c in calls if c[3]]
    plain = [c for c in calls if not c[3] and c[2] >= 2000]  # seeds 1000+i make the attack's training images
    assert len(attacked) == len(plain) == 2 and r["softprompt_n"] == 4
    for (pm, noise, seed, _), (po, ref_noise, ref_seed, _) in zip(attacked, plain):
        assert pm is model and po is original
        assert torch.equal(noise, ref_noise) and seed == ref_seed


def test_generic_report_refuses_models_that_sample_differently(sd_dirs):
    from trust_fast.world import load_pipeline

    pipe = load_pipeline(str(sd_dirs / "original"), device="cpu")
    with pytest.raises(ValueError, match="sample differently"):
        generic_report(pipe, load_pipeline("shapes", device="cpu"), ["a red circle"], [])


def test_the_world_model_with_user_prompts_gets_the_classifier_free_report(tmp_path, capsys):
    (tmp_path / "f.txt").write_text("a red circle\n")
    (tmp_path / "r.txt").write_text("a blue square\n")
    out = tmp_path / "r.json"
    assert main(["evaluate", "--concept", "red", "--forget-prompts", str(tmp_path / "f.txt"), "--retain-prompts",
                 str(tmp_path / "r.txt"), "--n-per-prompt", "2", "--steps", "3", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["reference"] == "shapes" and r["space"] == "pixel" and r["forget_change"] == 0.0
    assert "ua (needs a classifier; none judges these prompts)" in r["skipped"]


def test_to_pixels_honours_shift_factor_and_force_upcast():
    from types import SimpleNamespace

    from diffusers import AutoencoderKL

    from trust_fast.evaluation.metrics import to_pixels

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=8, sample_size=8, scaling_factor=0.5, shift_factor=0.25, force_upcast=True)
    z = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        want = vae.decode(z / 0.5 + 0.25).sample.clamp(-1, 1)
    got = to_pixels(SimpleNamespace(vae=vae), z, batch_size=2)
    assert torch.allclose(got, want, atol=1e-6) and got.shape == (3, 3, 8, 8)
    vae.half()  # an fp16 VAE that asks for float32 decoding gets it, and is handed back in fp16
    got16 = to_pixels(SimpleNamespace(vae=vae), z)
    assert next(vae.parameters()).dtype == torch.float16
    assert got16.dtype == torch.float32 and torch.allclose(got16, want, atol=1e-2)
    assert to_pixels(SimpleNamespace(), z[:, :3]).equal(z[:, :3])  # no VAE: already pixels


def test_cli_attacks_an_sdxl_model_through_both_text_encoders(tmp_path):
    """`evaluate --attack all` on an SDXL directory: the optimized attacks free tokens in both text
    encoders (trust_fast.softprompt) and report their classifier-free figures."""
    from tiny_pipelines import tiny_sdxl_pipeline

    _original_and_edited(tiny_sdxl_pipeline(), tmp_path)
    out = tmp_path / "r.json"
    assert _evaluate(tmp_path, "edited", "--attack", "all", "--softprompt-steps", "2", "--embedding-steps", "2",
                     "--inversion-steps", "2", "--out", str(out)) == 0
    r = json.loads(out.read_text())
    for name in ("softprompt", "embedding", "inversion"):
        assert r[f"{name}_n"] == 4 and r[f"{name}_change"] > 0 and f"{name}_recovery" in r, name
