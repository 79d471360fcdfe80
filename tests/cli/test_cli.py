"""The trust-fast command line on the built-in model: generate, evaluate, and its error handling."""
import json
import os
import subprocess
import sys

import pytest

from trust_fast.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trust_fast.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_writes_images_and_grid(tmp_path):
    out = tmp_path / "gen"
    assert main(["generate", "--prompt", "a striped red circle", "--n", "3", "--steps", "10", "--out", str(out)]) == 0
    names = sorted(os.listdir(out))
    assert names == [".trust_fast_output.json", "000.png", "001.png", "002.png", "grid.png"]  # the marker: ours
    from PIL import Image

    assert Image.open(out / "000.png").size == (16, 16)


@pytest.mark.slow
def test_evaluate_reports_ua_and_retain(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["evaluate", "--concept", "red", "--n-per-prompt", "1", "--steps", "10", "--out", str(out),
                 "--grids", str(tmp_path / "g")]) == 0
    report = json.loads(out.read_text())
    for key in ("ua", "retain_acc", "retain_color_acc", "retain_shape_acc", "retain_texture_acc",
                "n_images", "seconds", "fd", "fd_self"):
        assert key in report, key
    assert report["ua"] >= 0.9  # the original model draws red when asked
    assert report["retain_acc"] >= 0.85
    assert report["n_images"] == 24
    assert "retain_acc" in capsys.readouterr().out
    from PIL import Image  # one labelled row per prompt: original | evaluated, same noise

    assert report["grids"] == ["forget.png", "retain.png"]
    assert Image.open(tmp_path / "g" / "forget.png").height > 6 * 16 * 4  # the 6 forget prompts, 4x upscaled
    # the same report on a model that draws nothing of the world (untrained weights) must say so
    from trust_fast.world.train import build_untrained_pipeline

    build_untrained_pipeline(0).save_pretrained(tmp_path / "untrained")
    assert main(["evaluate", "--concept", "red", "--model", str(tmp_path / "untrained"), "--n-per-prompt", "1",
                 "--steps", "10", "--out", str(tmp_path / "u.json")]) == 0
    bad = json.loads((tmp_path / "u.json").read_text())
    assert bad["retain_acc"] <= 0.5 and bad["ua"] <= 0.5, bad
    assert bad["fd"] > 3 * max(bad["fd_self"], report["fd_self"]), bad


@pytest.mark.parametrize("args,message", [
    (["evaluate", "--concept", "purple"], "not a word of the shapes world"),
    (["evaluate", "--concept", "red+"], "malformed concept spec"),
    (["evaluate", "--concept", "red", "--model", "/nonexistent/model"], "neither a built-in model"),
    (["generate", "--prompt", "x", "--n", "0", "--out", "/tmp/x"], "--n must be positive"),
    (["evaluate", "--concept", "red", "--leak-prompts", "/nonexistent/prompts.txt"], "cannot read leak prompts file"),
    (["evaluate", "--concept", "red", "--reference", "none", "--leak-prompts", "/dev/null"], "needs a --reference"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_corrupt_model_directory(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text("{not json")
    r = run_cli("generate", "--model", str(tmp_path / "m"), "--prompt", "a red circle", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "cannot load model" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_evaluate_scans_for_leaks(tmp_path, capsys):
    """--leak-scan adds the scan of the whole prompt space to the report and the table;
    --leak-prompts scans the user's prompts against the reference (the model itself here: no change)."""
    out = tmp_path / "r.json"
    assert main(["evaluate", "--concept", "red+circle", "--n-per-prompt", "1", "--steps", "2", "--leak-scan",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "leak_max" in capsys.readouterr().out.splitlines()[0]
    assert report["leak_n_images"] == 245 and len(report["leak_worst"]) == 5
    assert report["leak_max"] == max(d["rate"] for d in report["leak_by_description"].values())
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na circle\n")
    out2 = tmp_path / "r2.json"
    assert main(["evaluate", "--concept", "red+circle", "--n-per-prompt", "2", "--steps", "2", "--leak-prompts",
                 str(prompts), "--out", str(out2)]) == 0
    report = json.loads(out2.read_text())
    assert report["leak_min_change"] == 0.0 and set(report["leak_change_by_prompt"]) == {"a red circle", "a circle"}
    assert "leak_n_images" not in report  # --leak-prompts replaces the world's scan
    r = run_cli("evaluate", "--concept", "circle", "--forget-prompts", str(prompts), "--leak-scan")
    assert r.returncode == 2 and "give your own with --leak-prompts" in r.stderr and len(r.stderr.splitlines()) == 1
