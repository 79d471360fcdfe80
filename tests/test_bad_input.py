"""Bad input and faults. CLI errors: one line on stderr naming the problem, exit 2, no traceback
(unless --debug), nothing written. Engine: a non-finite loss or gradient skips the step.

Bad inputs tested elsewhere (not repeated here): malformed concept specs and the API's empty spec
(test_concepts.test_parse_invalid_names_the_problem, test_cli.test_bad_input_is_one_line_and_exit_2),
a concept absent from user prompts and empty/unreadable prompt files at the API
(test_concepts.test_user_prompts_and_errors), output dir = model dir and non-positive steps
(test_cli_unlearn.test_unlearn_refuses_to_overwrite_the_model), corrupt model_index.json
(test_cli.test_corrupt_model_directory), kernel arguments of wrong dtype/device/shape and
out-of-range or duplicated rows (test_ops_api.test_bad_arguments_name_the_argument,
test_masked_adamw_bad_arguments, test_hutchinson_bad_arguments, test_optim.test_set_rows_and_penalty_errors),
a patch for another base at the API (test_patch.test_patch_refuses_another_base_and_changes_nothing).
"""
import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch

from trust_fast import TrustConfig, TrustUnlearner
from trust_fast.concepts import parse_concept, world_prompts
from trust_fast.cli import main
from trust_fast.world import model_path

SD_INDEX = '{"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.0"}'


def _fails(capsys, args: list[str], message: str, out=None) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.startswith("trust-fast: error: ") and len(err.strip().splitlines()) == 1, err
    if out is not None:
        assert not os.path.exists(out), "a failed run left its output behind"


@pytest.fixture
def sd_dir(tmp_path):
    """A directory that passes as a Stable Diffusion pipeline up to loading (prompt checks run first)."""
    d = tmp_path / "sd"
    d.mkdir()
    (d / "model_index.json").write_text(SD_INDEX)
    return d


@pytest.mark.parametrize("extra,message", [
    (["--concept", ""], "empty"),
    (["--concept", "red", "--lr", "0"], "--lr must be positive"),
    (["--concept", "red", "--lr=-1e-3"], "--lr must be positive"),
    (["--concept", "red", "--steps=-3"], "--steps must be positive"),
    (["--concept", "red", "--xi", "nan"], "xi must be a finite number"),
    (["--concept", "red", "--xi", "inf"], "xi must be a finite number"),
    (["--concept", "red", "--max-fraction", "0"], "max_fraction must be in (0, 1]"),
    (["--concept", "red", "--max-fraction", "1.5"], "max_fraction must be in (0, 1]"),
    (["--concept", "red", "--targets", " , "], "names no module pattern"),
    (["--concept", "red", "--checkpoint-every=-1"], "--checkpoint-every must be >= 0"),
    (["--concept", "red", "--model", "/nonexistent/model"], "neither a built-in model"),
])
def test_unlearn_rejects_bad_arguments_before_any_work(capsys, tmp_path, extra, message):
    out = tmp_path / "out"
    _fails(capsys, ["unlearn", *extra, "--out", str(out)], message, out)


def test_unlearn_rejects_a_resume_dir_without_checkpoint(capsys, tmp_path):
    out = tmp_path / "out"
    _fails(capsys, ["unlearn", "--concept", "red", "--resume", str(tmp_path), "--out", str(out)],
           "holds no checkpoint", out)


def test_output_dir_not_writable(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails(capsys, ["unlearn", "--concept", "red", "--out", str(blocker / "out")], "is not writable")
    _fails(capsys, ["unlearn", "--concept", "red", "--out", str(blocker)], "exists and is not a directory")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.geteuid() != 0:  # root ignores permission bits; the file case above covers it there
            _fails(capsys, ["unlearn", "--concept", "red", "--out", str(locked / "out")], "is not writable",
                   locked / "out")
    finally:
        locked.chmod(0o700)


def test_prompt_files_empty_unreadable_or_without_the_concept(capsys, tmp_path, sd_dir):
    out = tmp_path / "out"
    base = ["unlearn", "--model", str(sd_dir), "--concept", "van gogh", "--out", str(out)]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    _fails(capsys, base + ["--forget-prompts", str(empty)], "is empty", out)
    _fails(capsys, base + ["--forget-prompts", str(tmp_path / "missing.txt")], "cannot read forget prompts file",
           out)
    if os.geteuid() != 0:
        locked = tmp_path / "locked.txt"
        locked.write_text("a painting by van gogh\n")
        locked.chmod(0o000)
        _fails(capsys, base + ["--forget-prompts", str(locked)], "Permission denied", out)
    monet = tmp_path / "monet.txt"
    monet.write_text("a painting by Monet\nwater lilies\n")
    _fails(capsys, base + ["--forget-prompts", str(monet)], "is absent from forget prompt(s)", out)
    good = tmp_path / "good.txt"
    good.write_text("a painting by van gogh\n")
    _fails(capsys, base + ["--forget-prompts", str(good), "--retain-prompts", str(empty)],
           "retain prompts file", out)


def test_targets_matching_no_module(capsys, tmp_path):
    out = tmp_path / "out"
    _fails(capsys, ["unlearn", "--concept", "red", "--targets", "*attn9.to_z", "--no-eval", "--out", str(out)],
           "no module of the UNet matches the target patterns ['*attn9.to_z']", out)


def test_corrupt_unet_weights(capsys, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(model_path("shapes"), model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = tmp_path / "out"
    _fails(capsys, ["unlearn", "--model", str(model), "--concept", "red", "--out", str(out)],
           f"cannot load model {str(model)!r}", out)


def test_debug_shows_the_traceback_and_plain_errors_do_not():
    args = ["unlearn", "--concept", "red", "--xi", "nan", "--out", "/tmp/trust-fast-never-written"]
    procs = [subprocess.Popen([sys.executable, "-m", "trust_fast.cli", *flag, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for flag in ([], ["--debug"])]
    plain, debug = (subprocess.CompletedProcess(p.args, 0, *p.communicate(timeout=120)) for p in procs)
    plain.returncode, debug.returncode = (p.returncode for p in procs)
    assert plain.returncode == 2 and plain.stderr.strip().splitlines() == [
        "trust-fast: error: xi must be a finite number, got nan"]
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "xi must be a finite number" in debug.stderr
    assert not os.path.exists("/tmp/trust-fast-never-written")


# ------------------------------------------------------------------------------------------ faults


@pytest.fixture(scope="module")
def untrained_world():
    from trust_fast.world.train import build_untrained_pipeline

    return build_untrained_pipeline(0)


def _poison_call(module: torch.nn.Module, call: int):
    """Forward hook that turns the module's output into NaN on its `call`-th call (1-based), once."""
    count = {"n": 0}

    def hook(mod, args, output):
        count["n"] += 1
        return output * float("nan") if count["n"] == call else output

    return module.register_forward_hook(hook)


def test_non_finite_steps_are_skipped_and_change_nothing(untrained_world):
    """The UNet's 1st call in a step is the frozen target pass (poisons the forget loss), its 3rd
    the retain pass of a Hutchinson step, after localization ran: its rows must be rolled back too."""
    u = TrustUnlearner(copy.deepcopy(untrained_world), "red", prompts=world_prompts(parse_concept("red")),
                       config=TrustConfig(x0_per_prompt=1, x0_steps=2, batch_size=4, retain_batch_size=4, diag_interval=1))
    u.step()
    for call, what in ((1, "forget"), (3, "retain")):
        weights = [p.detach().clone() for p in u.params]
        opt = copy.deepcopy(u.optimizer.state_dict())
        diags, count = [d.clone() for d in u.hutchinson.diags], u.hutchinson.count
        rows = [r.clone() for r in u.localizer.rows]
        handle = _poison_call(u.targets[0].module, call)
        try:
            stats = u.step()
        finally:
            handle.remove()
        assert stats["skipped"] and stats["selected_rows"] == 0, what
        assert (stats["loss_forget"] != stats["loss_forget"]) == (what == "forget")  # NaN where poisoned
        assert all(torch.equal(p, w) for p, w in zip(u.params, weights)), what
        now = u.optimizer.state_dict()
        assert now["state"].keys() == opt["state"].keys()
        for key, st in opt["state"].items():
            for k, v in st.items():
                assert torch.equal(now["state"][key][k], v) if isinstance(v, torch.Tensor) else now["state"][key][k] == v
        assert u.hutchinson.count == count and all(torch.equal(a, b) for a, b in zip(u.hutchinson.diags, diags))
        assert all(torch.equal(a, b) for a, b in zip(u.localizer.rows, rows)), what
    after = u.step()
    assert not after["skipped"] and after["selected_rows"] > 0
    assert any(not torch.equal(p, w) for p, w in zip(u.params, weights))
    report = u.report()
    assert report["skipped_steps"] == 2 and report["steps"] == 4
