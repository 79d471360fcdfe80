"""`trust-fast unlearn` and `trust-fast demo`: outputs, report keys, refusals, a non-world pipeline."""
import json
import os

import pytest

from trust_fast.cli import main

REPORT_KEYS = ("concept", "method", "steps", "seconds", "trainable_params", "mean_selected_rows", "ua_before",
               "ua_after", "retain_before", "retain_after", "optimizer_state_bytes", "history")


@pytest.mark.slow
def test_unlearn_writes_a_loadable_pipeline_and_report(tmp_path, capsys):
    out = tmp_path / "esd-red"
    assert main(["unlearn", "--concept", "red", "--method", "esd", "--steps", "2", "--n-per-prompt", "1",
                 "--eval-every", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    for key in REPORT_KEYS:
        assert key in report, key
    assert report["method"] == "esd" and report["steps"] == 2 and len(report["history"]) == 2
    assert report["ua_before"] >= 0.8  # the shipped model draws red when asked
    assert report["ua_after"] == report["eval_after"]["ua"] and report["trainable_params"] > 0
    # labelled before | after grids, and UA / retain against the step (the original at step 0)
    assert report["pictures"] == ["forget.png", "retain.png", "history.png"]
    assert [e["step"] for e in report["evals"]] == [1, 2]
    from PIL import Image

    assert Image.open(out / "history.png").size[0] >= 600 and Image.open(out / "forget.png").mode == "RGB"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["ua", "retain_acc"]  # the before/after table
    assert [ln.split()[0] for ln in lines[1:3]] == ["before", "after"]
    assert main(["generate", "--model", str(out), "--prompt", "a red circle", "--n", "2", "--steps", "5",
                 "--out", str(tmp_path / "gen")]) == 0


def test_unlearn_refuses_to_overwrite_the_model(tmp_path, capsys):
    from trust_fast.world import model_path

    assert main(["unlearn", "--concept", "red", "--out", model_path("shapes")]) == 2
    assert "model directory itself" in capsys.readouterr().err
    assert main(["unlearn", "--concept", "purple", "--out", str(tmp_path / "x")]) == 2
    assert main(["unlearn", "--concept", "red", "--steps", "0", "--out", str(tmp_path / "x")]) == 2
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.slow
def test_unlearn_a_stable_diffusion_directory_from_prompt_files(tmp_path, capsys):
    from test_engine import tiny_sd_pipeline

    model = tmp_path / "sd"
    tiny_sd_pipeline().save_pretrained(model)
    assert main(["unlearn", "--model", str(model), "--concept", "red", "--out", str(tmp_path / "o")]) == 2
    assert "--forget-prompts" in capsys.readouterr().err
    (tmp_path / "forget.txt").write_text("a red circle\na red square\n")
    (tmp_path / "retain.txt").write_text("a blue circle\n")
    assert main(["unlearn", "--model", str(model), "--concept", "red", "--steps", "2", "--hessian", "hvp",
                 "--forget-prompts", str(tmp_path / "forget.txt"), "--retain-prompts", str(tmp_path / "retain.txt"),
                 "--out", str(tmp_path / "o")]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["steps"] == 2 and report["config"]["hessian"] == "hvp" and "ua_before" not in report
    # 2 steps cannot update a row 3 times: finalize restores every row, and the CLI says so
    assert report["finalized"]["rows_kept"] == 0 and report["finalized"]["rows_ever_updated"] > 0
    assert "warning: the saved model is unchanged: no row was updated 3 times" in capsys.readouterr().err
    assert json.loads((tmp_path / "o" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    # evaluated against the original (reloaded from --model) without a classifier, with its grids
    free = report["eval_vs_original"]
    assert free["forget_change"] == free["retain_change"] == 0.0  # finalize restored every row: unchanged
    assert report["pictures"] == ["forget.png", "retain.png"] and (tmp_path / "o" / "forget.png").is_file()
    assert any(s.startswith("ua ") for s in free["skipped"])


@pytest.mark.slow
def test_demo_writes_before_after_grids(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "1", "--n-per-prompt", "1", "--out", str(out)]) == 0
    for name in ("forget.png", "retain.png", "history.png", "report.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["pictures"] == ["forget.png", "retain.png", "history.png"]
    assert (out / "model" / "model_index.json").is_file()
    text = capsys.readouterr().out
    assert "before" in text and "after" in text and "retain_acc" in text


def test_unlearning_flags_reach_the_config():
    """Every TrustConfig flag of `unlearn` lands in the config it trains with; unset flags keep the
    method's defaults."""
    from trust_fast.cli import build_parser
    from trust_fast.cli.unlearn import unlearning_config
    from trust_fast.methods import config

    args = build_parser().parse_args(["unlearn", "--concept", "red", "--out", "o", "--adv-mode", "tokens",
                                      "--adv-prefix", "3", "--x0-per-prompt", "4", "--x0-retain-per-prompt", "1",
                                      "--seed", "7"])
    cfg = unlearning_config(args)
    assert (cfg.adv_mode, cfg.adv_prefix, cfg.x0_per_prompt, cfg.x0_retain_per_prompt, cfg.seed) == (
        "tokens", 3, 4, 1, 7)
    plain = unlearning_config(build_parser().parse_args(["unlearn", "--concept", "red", "--out", "o"]))
    assert plain == config("trust", seed=0)
