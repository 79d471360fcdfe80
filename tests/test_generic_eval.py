"""Evaluation without a classifier (models outside the shapes world): paired change against the
original model, CLIP-free Frechet distance, the soft-prompt attack's distance, grids, and what was
skipped. Tiny Stable Diffusion pipelines built from configs; nothing is downloaded."""
import json

import pytest
import torch

from trust_fast.cli import main
from trust_fast.evaluation import generic_report


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory):
    """An original tiny SD pipeline and a copy whose cross-attention keys were perturbed."""
    from test_engine import tiny_sd_pipeline

    root = tmp_path_factory.mktemp("sd")
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(root / "original")
    with torch.no_grad():
        for name, w in pipe.unet.named_parameters():
            if "attn2.to_k" in name:
                w.add_(0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
    pipe.save_pretrained(root / "edited")
    (root / "forget.txt").write_text("a red circle\na red square\n")
    (root / "retain.txt").write_text("a blue circle\na green square\n")
    return root


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


def test_cli_reports_change_attack_grids_and_what_it_skipped(sd_dirs, tmp_path, capsys):
    out, grids = tmp_path / "r.json", tmp_path / "grids"
    assert _evaluate(sd_dirs, "edited", "--attack", "all", "--softprompt-steps", "2", "--grids", str(grids),
                     "--out", str(out)) == 0
    r = json.loads(out.read_text())
    assert r["forget_change"] > 0 and r["retain_change"] > 0 and r["selectivity"] > 0
    assert r["softprompt_change"] > 0 and r["softprompt_n"] == 4 and len(r["softprompt"]["per_prompt"]) == 2
    assert "ua" not in r and "asr_softprompt" not in r
    skipped = " ".join(r["skipped"])
    for what in ("ua", "retain_acc", "asr_paraphrase", "asr_softprompt"):
        assert what in skipped, what
    printed = capsys.readouterr().out
    assert "skipped: ua (no classifier for this model)" in printed and "forget_change" in printed
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
    with pytest.raises(ValueError, match="attack must be one of"):
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


def test_cli_refuses_an_unwritable_grids_dir_before_sampling(sd_dirs, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _evaluate(sd_dirs, "edited", "--grids", str(blocker)) == 2
    assert "--grids" in capsys.readouterr().err and blocker.read_text() == "x"
