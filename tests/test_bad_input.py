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

from helpers import tiny_config
from trust_fast import TrustUnlearner
from trust_fast.concepts import parse_concept
from trust_fast.world.concepts import world_prompts
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
           "no module of the denoiser matches the target patterns ['*attn9.to_z']", out)


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
                       config=tiny_config(diag_interval=1))
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


# ------------------------------------------------------------------ files trusted too much, numbers
# Each case: exit 2 (CLI) or ValueError (API), one line naming the problem, no traceback, and every
# file that existed before byte-identical afterwards (test_output_safety.refused hashes the tree).

from test_output_safety import refused, snapshot  # noqa: E402


@pytest.fixture(scope="module")
def patch_parts():
    """(tensors, metadata) of a valid patch of the built-in model: rows 1 and 3 of conv_in changed."""
    from trust_fast.patch import make_patch
    from trust_fast.world import load_pipeline

    base, new = load_pipeline("shapes", "cpu"), load_pipeline("shapes", "cpu")
    with torch.no_grad():
        new.unet.conv_in.weight[[1, 3]] += 0.5
    return make_patch(base, new)


def _craft(tensors: dict, meta: dict, case: str) -> tuple[dict, dict]:
    import json

    name = json.loads(meta["tensors"])[0]
    rows, values = f"{name}::rows", f"{name}::values"
    t, m = dict(tensors), dict(meta)
    if case == "missing key":
        del t[values]
    elif case == "row out of range":
        t[rows] = torch.tensor([1, 10_000])
    elif case == "negative row":
        t[rows] = torch.tensor([-1, 3])
    elif case == "float rows":
        t[rows] = t[rows].double()
    elif case == "repeated rows":
        t[rows] = torch.tensor([3, 3])
    elif case == "values shape":
        t[values] = t[values][:, :-1].contiguous()
    elif case == "values dtype":
        t[values] = t[values].double()
    elif case == "count mismatch":
        m["changed_rows"] = "7"
    elif case == "nan values":
        v = t[values].clone()
        v[0, 0] = float("nan")
        t[values] = v
    elif case == "text encoder":
        te = "text_encoder.embeddings.token_embedding.weight"
        t[f"{te}::rows"], t[f"{te}::values"] = torch.tensor([0]), torch.zeros(1, 32)
        m["tensors"] = json.dumps(sorted([*json.loads(m["tensors"]), te]))
        m["changed_rows"] = str(int(m["changed_rows"]) + 1)
    elif case == "no format":
        m["format"] = "something else"
    return t, m


@pytest.mark.parametrize("case,message", [
    ("missing key", "do not match its metadata's list"),
    ("row out of range", "row 10000 of"),
    ("negative row", "negative or repeated indices"),
    ("float rows", "not a non-empty 1-D int64 tensor"),
    ("repeated rows", "negative or repeated indices"),
    ("values shape", "have shape"),
    ("values dtype", "are torch.float64; patch values are float32, float16 or bfloat16"),
    ("count mismatch", "its metadata counts 7"),
    ("nan values", "are not all finite"),
    ("text encoder", "is outside the denoiser"),
    ("no format", "is not a trust_fast patch"),
])
def test_crafted_patches_are_refused_in_one_line(capsys, tmp_path, patch_parts, case, message):
    from safetensors.torch import save_file  # a crafted file, not written by trust_fast's writer

    tensors, meta = _craft(*patch_parts, case)
    save_file(tensors, str(tmp_path / "p.safetensors"), metadata=meta)
    refused(capsys, tmp_path, ["apply-patch", "--base", "shapes", "--patch", str(tmp_path / "p.safetensors"), "--out",
                               str(tmp_path / "out")], message)


def test_export_refuses_changes_outside_the_unet():
    from trust_fast.patch import make_patch
    from trust_fast.world import load_pipeline

    base, new = load_pipeline("shapes", "cpu"), load_pipeline("shapes", "cpu")
    with torch.no_grad():
        new.text_encoder.embeddings.token_embedding.weight[0] += 1
    with pytest.raises(ValueError, match="outside the denoiser; a patch carries rows of the unet or transformer only"):
        make_patch(base, new)


@pytest.fixture
def saved_checkpoint(untrained_world, tmp_path):
    """(unlearner after one step, its checkpoint state) for crafting damaged checkpoints."""
    from trust_fast.checkpoint import save_checkpoint

    u = TrustUnlearner(copy.deepcopy(untrained_world), "red",
                       tiny_config(steps=4))
    u.step()
    path = save_checkpoint(u, str(tmp_path / "good"))
    return u, torch.load(path, weights_only=True)


def _damage(state: dict, case: str) -> dict:
    s = dict(state)
    if case == "wrong shape":
        s["params"] = [s["params"][0][:-1], *s["params"][1:]]
    elif case == "fewer params":
        s["params"] = s["params"][:-1]
    elif case == "missing key":
        del s["params"]
    elif case == "rows out of range":
        s["localizer_rows"] = [torch.tensor([10_000]), *s["localizer_rows"][1:]]
    elif case == "nan weights":
        s["params"] = [s["params"][0] * float("nan"), *s["params"][1:]]
    elif case == "optimizer params":
        s["optimizer"] = {**s["optimizer"], "param_groups": []}
    elif case == "prefix width":  # a prefix made for other text encoders
        s["adversary"] = {**s["adversary"], "prefixes": [q[:, :-1] for q in s["adversary"]["prefixes"]]}
    return s


@pytest.mark.parametrize("case,message", [
    ("wrong shape", "target parameter 0: shape"),
    ("fewer params", r"target parameter: \d+ tensors, expected \d+"),
    ("missing key", "'params' is missing"),
    ("rows out of range", "localizer rows of target 0"),
    ("nan weights", "target parameter 0 is not finite"),
    ("optimizer params", "param groups"),
    ("prefix width", r"adversarial prefix 0: shape \(5, \d+\), expected \(5, \d+\)"),
])
def test_damaged_checkpoints_are_refused_and_change_nothing(saved_checkpoint, tmp_path, case, message):
    from trust_fast.checkpoint import load_checkpoint

    u, state = saved_checkpoint
    (tmp_path / case).mkdir()
    torch.save(_damage(state, case), tmp_path / case / "checkpoint.pt")
    weights, steps = [p.detach().clone() for p in u.params], u.step_count
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=message) as e:
        load_checkpoint(u, str(tmp_path / case))
    assert len(str(e.value).splitlines()) == 1
    assert all(torch.equal(p, w) for p, w in zip(u.params, weights)) and u.step_count == steps
    assert snapshot(tmp_path) == before


def test_truncated_or_pickled_checkpoints_say_so_in_one_line(saved_checkpoint, tmp_path):
    import pickle

    from trust_fast.checkpoint import load_checkpoint

    u, _ = saved_checkpoint
    good = (tmp_path / "good" / "checkpoint.pt").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "checkpoint.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "code").mkdir()
    with open(tmp_path / "code" / "checkpoint.pt", "wb") as f:
        torch.save({"format": "trust_fast.checkpoint/1", "x": pickle.loads(pickle.dumps(ValueError("x")))}, f)
    for name, message in (("cut", r"is damaged \("), ("code", "holds objects other than tensors")):
        with pytest.raises(ValueError, match=message) as e:
            load_checkpoint(u, str(tmp_path / name))
        text = str(e.value)
        assert len(text.splitlines()) == 1 and "weights_only" not in text, text


def test_a_model_missing_half_its_unet_weights(capsys, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(model_path("shapes"), model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    save_file({k: tensors[k] for k in sorted(tensors)[: len(tensors) // 2]}, weights)
    refused(capsys, tmp_path, ["unlearn", "--model", str(model), "--concept", "red", "--no-eval",
                               "--checkpoint-every", "1", "--out", str(tmp_path / "out")], "its unet weights lack")


@pytest.mark.parametrize("args,message", [
    (["unlearn", "--concept", "red", "--n-per-prompt", "0"], "--n-per-prompt must be positive, got 0"),
    (["unlearn", "--concept", "red", "--eval-every=-1"], "--eval-every must be >= 0"),
    (["unlearn", "--concept", "red", "--seed", str(2**64)], "--seed must be in [0, 2**63)"),
    (["unlearn", "--concept", "red", "--seed=-1"], "--seed must be in [0, 2**63)"),
    (["unlearn", "--concept", "red", "--batch-size", "0"], "--batch-size must be positive"),
    (["unlearn", "--concept", "red", "--x0-retain-per-prompt", "0"], "--x0-retain-per-prompt must be positive"),
    (["unlearn", "--concept", "red", "--alpha", "nan"], "--alpha must be a finite number"),
    (["generate", "--prompt", "a red circle", "--guidance", "nan"], "--guidance must be a finite number"),
    (["generate", "--prompt", "a red circle", "--guidance=-2"], "--guidance must be >= 0"),
    (["generate", "--prompt", "a red circle", "--n", "0"], "--n must be positive"),
    (["generate", "--prompt", "x" * 100_000], "--prompt has 100000 characters; at most 1000"),
    (["evaluate", "--concept", "red", "--softprompt-steps", "0"], "--softprompt-steps must be positive"),
    (["world", "train", "--diffusion-steps=-1"], "--diffusion-steps must be positive"),
    (["world", "train", "--diffusion-steps", "0"], "--diffusion-steps must be positive"),
    (["world", "train", "--max-minutes", "0"], "--max-minutes must be positive"),
])
def test_numbers_that_would_crash_or_do_nothing(capsys, tmp_path, args, message):
    refused(capsys, tmp_path, [*args, "--out", str(tmp_path / "out")], message)


def test_a_huge_spec_is_not_echoed_back(capsys, tmp_path):
    err = refused(capsys, tmp_path, ["unlearn", "--concept", "red" * 40_000, "--out", str(tmp_path / "out")],
                  "concept spec is 120000 characters long")
    assert len(err) < 300


def test_prompt_files_too_long_are_refused_at_once(capsys, tmp_path, sd_dir):
    many = tmp_path / "many.txt"
    many.write_text("a painting by van gogh\n" * 10_001)
    long_line = tmp_path / "long.txt"
    long_line.write_text("a painting by van gogh " + "x" * 2000 + "\n")
    base = ["unlearn", "--model", str(sd_dir), "--concept", "van gogh", "--out", str(tmp_path / "out")]
    refused(capsys, tmp_path, [*base, "--forget-prompts", str(many)], "has more than 10000 prompts")
    refused(capsys, tmp_path, [*base, "--forget-prompts", str(long_line)], "line 1: a prompt of 2023 characters")


def test_a_checkpoint_that_cannot_be_written_costs_the_run_nothing_else(untrained_world, tmp_path, monkeypatch):
    """Disk full at a checkpoint: one warning, training goes on, the next interval tries again."""
    import errno

    from trust_fast import checkpoint

    real, calls = checkpoint.torch.save, {"n": 0}

    def full_once(obj, f):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", full_once)
    u = TrustUnlearner(copy.deepcopy(untrained_world), "red",
                       tiny_config(steps=4))
    with pytest.warns(UserWarning, match=r"could not write the checkpoint of step 2 .*No space left on device"):
        u.run(checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2)
    assert u.step_count == 4 and u.report()["failed_checkpoints"] == [2]
    assert torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=True)["step_count"] == 4
    assert [e for e in os.listdir(tmp_path / "ckpt") if "tmp" in e] == []  # the failed write left nothing


def test_a_non_finite_forget_loss_alone_skips_the_step(untrained_world):
    """Through the low-level API only the forget loss is NaN (the step() test above poisons a
    frozen pass that serves the retain target too, so the retain check alone would catch it)."""
    u = TrustUnlearner(copy.deepcopy(untrained_world), "red",
                       tiny_config(hessian="none"))
    u.step()
    weights = [p.detach().clone() for p in u.params]
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 1000, (4,), generator=g)
    from trust_fast.engine import encode_prompts

    cond = encode_prompts(u.pipe, ["a red circle"] * 4)
    anchor = encode_prompts(u.pipe, ["a blue circle"] * 4)
    stats = u.update(u.forget_loss(x, t, cond, anchor) * float("nan"), u.retain_loss(x, t, anchor))
    assert stats["skipped"] and stats["selected_rows"] == 0 and u.skipped_steps == 1
    assert all(torch.equal(p, w) for p, w in zip(u.params, weights))
