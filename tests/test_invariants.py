"""Reliability invariants (issue #32): nothing a user owns is removed, nothing non-finite is ever
saved, no run that changed nothing ends without saying so, and every damaged field of a
checkpoint is one line naming the file and the field.

Each case was a failure of an outside probe of main 91fe256; the tests reproduce it first.
"""
import copy
import os
import re

import pytest
import torch

from helpers import SMALL, refused, snapshot, tiny_args
from trust_fast import TrustConfig, TrustUnlearner
from trust_fast.cli import main

GEN = ["generate", "--prompt", "a red circle", "--n", "1", "--steps", "2"]
FAST = ["--steps", "1", *tiny_args(batch=None), "--no-eval"]


# ------------------------------------------------------------------------------- data loss


def test_overwriting_a_checkpoint_directory_keeps_the_users_files(capsys, tmp_path):
    """Checkpoint directories had a marker without a file list, and an overwrite skipped the
    'files trust_fast did not write' check: generate --overwrite deleted a user's NOTES.txt."""
    ckpt = tmp_path / "ckpt"
    assert main(["unlearn", "--concept", "red", *FAST, "--checkpoint-every", "1", "--checkpoint-dir", str(ckpt),
                 "--out", str(tmp_path / "out")]) == 0
    assert (ckpt / "checkpoint.pt").is_file()
    (ckpt / "NOTES.txt").write_text("mine\n")
    refused(capsys, tmp_path, [*GEN, "--out", str(ckpt), "--overwrite"], "holds files trust_fast did not write (NOTES.txt)")
    # and a run that reuses the directory for its checkpoints keeps the note too
    assert main(["unlearn", "--concept", "red", *FAST, "--checkpoint-every", "1", "--checkpoint-dir", str(ckpt),
                 "--out", str(tmp_path / "out2"), "--overwrite"]) == 2
    assert (ckpt / "NOTES.txt").read_text() == "mine\n"
    os.unlink(ckpt / "NOTES.txt")
    assert main([*GEN, "--out", str(ckpt), "--overwrite"]) == 0  # all of it trust_fast's: replaced
    assert not (ckpt / "checkpoint.pt").exists()


@pytest.mark.parametrize("what", ["symlink to a directory", "empty directory", "symlink to a file"])
def test_overwrite_never_removes_a_link_or_an_empty_directory_the_user_added(capsys, tmp_path, what):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    assert main([*GEN, "--out", str(out)]) == 0
    elsewhere.mkdir()
    (elsewhere / "data.txt").write_text("precious\n")
    entry = out / "added"
    if what == "symlink to a directory":
        entry.symlink_to(elsewhere, target_is_directory=True)
    elif what == "empty directory":
        entry.mkdir()
    else:
        entry.symlink_to(elsewhere / "data.txt")
    refused(capsys, tmp_path, [*GEN, "--out", str(out), "--overwrite"], "holds files trust_fast did not write (added")
    assert os.path.lexists(entry) and (elsewhere / "data.txt").read_text() == "precious\n"


def test_an_old_checkpoint_marker_without_a_file_list_vouches_only_for_checkpoints(capsys, tmp_path):
    """Markers written before file lists (``"files": null``): the directory is trust_fast's only
    as far as its checkpoint files go."""
    import json

    from trust_fast.io import MARKER

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / MARKER).write_text(json.dumps({"written_by": "trust_fast", "what": "checkpoint directory",
                                           "files": None}))
    (ckpt / "checkpoint.pt").write_bytes(b"x")
    (ckpt / "NOTES.txt").write_text("mine\n")
    refused(capsys, tmp_path, [*GEN, "--out", str(ckpt), "--overwrite"], "did not write (NOTES.txt, checkpoint.pt)")


@pytest.mark.parametrize("entry,kind", [
    (".gen.trust-fast-lock", "file"),           # the lock's name
    (".gen.trust-fast-lock", "symlink"),        # ... as a link to a user's file elsewhere
    (".gen.trust-fast-tmp-mine", "directory"),  # a staging directory's name
    (".gen.trust-fast-old", "file"),            # the name an output waits under while it is replaced
])
def test_user_entries_named_like_trust_fasts_own_are_never_touched(capsys, tmp_path, entry, kind):
    """The lock was truncated (through a symlink too) and removed, a directory of the staging name
    removed with its files, and a file of the backup name renamed onto the output."""
    work, elsewhere = tmp_path / "w", tmp_path / "elsewhere.txt"
    work.mkdir()
    elsewhere.write_text("precious\n")
    path = work / entry
    if kind == "file":
        path.write_text("mine\n")
    elif kind == "symlink":
        path.symlink_to(elsewhere)
    else:
        path.mkdir()
        (path / "keep.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    code = main([*GEN, "--out", str(work / "gen")])
    err = capsys.readouterr().err
    after = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("w/gen")}
    assert after == before, err  # every entry the user had, byte for byte; only gen/ may be new
    if code != 0:
        assert code == 2 and err.startswith("trust-fast: error: ") and len(err.strip().splitlines()) == 1, err
        assert "move it away" in err and not (work / "gen").exists()


def test_a_deeply_nested_marker_or_report_is_one_line(capsys, tmp_path):
    out = tmp_path / "gen"
    out.mkdir()
    (out / ".trust_fast_output.json").write_text("[" * 200_000 + "]" * 200_000)
    for extra in ([], ["--overwrite"]):
        refused(capsys, tmp_path, [*GEN, "--out", str(out), *extra], "was not written by trust_fast")


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(overwrite="no"), TypeError, "overwrite must be True or False, got 'no'"),
    (dict(inputs="abc"), TypeError, "inputs must be (label, path) pairs"),
])
def test_claim_output_refuses_arguments_of_the_wrong_type(tmp_path, kwargs, error, message):
    from trust_fast.io import claim_output

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(error) as e:
        with claim_output(str(tmp_path / "out"), **kwargs):
            pass
    assert message in str(e.value) and (tmp_path / "out" / "x").read_text() == "x"
    with pytest.raises(TypeError, match="must be a path"):
        with claim_output(123):
            pass


# ------------------------------------------------------------------------ damaged checkpoints


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    """A checkpoint of two CLI steps (adversary and Hessian diagonal on), and the arguments that
    resume it."""
    root = tmp_path_factory.mktemp("good")
    args = ["unlearn", "--concept", "red", *tiny_args(), "--no-eval", "--checkpoint-every", "1",
            "--checkpoint-dir", str(root / "ckpt")]
    assert main([*args, "--steps", "2", "--out", str(root / "out")]) == 0
    return torch.load(root / "ckpt" / "checkpoint.pt", weights_only=True), args


def _resume_refused(capsys, tmp_path, state: dict, args: list[str], message: str) -> str:
    """Resuming from `state`: exit 2, one line naming the problem, nothing written or changed."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    torch.save(state, ckpt / "checkpoint.pt")
    return refused(capsys, tmp_path, [*args[:-2], "--resume", str(ckpt), "--steps", "4",
                                      "--out", str(tmp_path / "out")], message)


def _edit(state: dict, path: str, value) -> dict:
    """A deep copy of `state` with the entry at dotted `path` set to `value` (absent: deleted)."""
    out = copy.deepcopy(state)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[int(key) if isinstance(node, list) else (int(key) if key.isdigit() and int(key) in node else key)]
    key = int(last) if isinstance(node, list) or (last.isdigit() and int(last) in node) else last
    if value is _DELETE:
        del node[key]
    else:
        node[key] = value(node[key]) if callable(value) else value
    return out


_DELETE = object()


def _poison(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = value
    return t


@pytest.mark.parametrize("path,value,message", [
    # what the probe found accepted (saved non-finite weights, wrong step counts, skipped every step)
    ("optimizer.state.0.exp_avg_sq", lambda t: -t - 1, "'exp_avg_sq' holds a negative second moment"),
    ("optimizer.state.0.exp_avg", lambda t: _poison(t, float("nan")), "'exp_avg' is not finite"),
    ("pools.forget", lambda t: _poison(t, float("nan")), "data-free images 'forget' is not finite"),
    ("step_count", 10**9, "'step_count' is 1000000000, but the history's last step is 1"),
    ("step_count", -5, "'step_count' is -5, expected 0 <= step_count"),
    # and what it crashed on with a traceback
    ("history", {}, "'history.steps' is missing, expected list"),
    ("concept", _DELETE, "'concept' is missing"),
    ("generator", lambda t: t[:-8], "generator: shape"),
    ("torch_rng", lambda t: torch.cat([t, t]), "torch_rng: shape"),
    ("history.steps", "12", "'history.steps' is str, expected list"),
    ("pools", {"forget": torch.zeros(1), "mine": torch.zeros(1)}, "pools ['forget', 'mine'], expected ['anchor', 'forget', 'retain']"),
    # their neighbours
    ("skipped_steps", 3, "'skipped_steps' is 3, expected 0 <= skipped_steps <= 2"),
    ("optimizer.state.0.step", lambda t: t + 5, "optimizer.state[0].step holds counts outside [0, 2]"),
    ("hutchinson.diags.0", lambda t: _poison(t, float("inf")), "Hessian diagonal 0 is not finite"),
    ("adversary.optimizers.0.state.0.exp_avg_sq", lambda t: -t - 1, "holds -"),
    ("adversary.emb_forget.0", lambda t: _poison(t, float("nan")), "adversary.emb_forget 0 is not finite"),
    ("params.0", lambda t: t.to(torch.float8_e4m3fn), "which trust_fast never stores"),
    ("seconds", float("nan"), "'seconds' is nan, expected a finite number >= 0"),
    ("history.steps.0.step", "0", "'history.steps[0].step' is str, expected int"),
    ("localizer_rows.0", lambda t: torch.cat([t, t[:1]]) if t.numel() else torch.tensor([0, 0]), "hold a row more than once"),
])
def test_a_damaged_checkpoint_field_is_one_line_and_resumes_nothing(capsys, tmp_path, good_checkpoint, path, value,
                                                                    message):
    state, args = good_checkpoint
    err = _resume_refused(capsys, tmp_path, _edit(state, path, value), args, message)
    assert "checkpoint.pt" in err


# ------------------------------------------------------------- non-finite weights, silent runs


def _nan_model(tmp_path, module: str = "attn2.to_k"):
    """A copy of the built-in model whose first `module` weight holds one NaN."""
    import shutil

    from safetensors.torch import load_file, save_file

    from trust_fast.world import model_path

    model = tmp_path / "model"
    shutil.copytree(model_path("shapes"), model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in sorted(tensors) if k.endswith(f"{module}.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights)
    return model, name


def test_a_model_with_nan_weights_is_not_unlearned(capsys, tmp_path):
    model, name = _nan_model(tmp_path)
    refused(capsys, tmp_path, ["unlearn", "--model", str(model), "--concept", "red", *FAST, "--out",
                               str(tmp_path / "out")],
            f"cannot unlearn from a model with non-finite weights (NaN or Inf in unet.{name})")


def test_a_huge_lr_diverges_and_nothing_is_saved(capsys, tmp_path):
    """--lr 1e30: the first update is finite (1e30), every later loss is NaN. The run used to save
    weights of 1e30 with exit 0 and no word; now it is refused and nothing is written."""
    before = snapshot(tmp_path)
    assert main(["unlearn", "--concept", "red", "--lr", "1e30", "--steps", "4", *tiny_args(batch=None), "--no-eval",
                 "--out", str(tmp_path / "out")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert last.startswith("trust-fast: error: refusing to save: the run diverged: 3 of its 4 steps were skipped "
                           "for non-finite values") and "lower lr (now 1e+30)" in last, last
    assert snapshot(tmp_path) == before


def test_a_run_that_selects_no_row_says_the_model_is_unchanged(capsys, tmp_path):
    """--xi 1e30 selects no row at any step: the model is saved as it was, and the run says so."""
    import json

    assert main(["unlearn", "--concept", "red", "--xi", "1e30", "--steps", "2", *tiny_args(batch=None), "--no-eval",
                 "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "warning: the saved model is unchanged: no row was selected at any of its 2 steps (xi=1e+30" in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["changed_rows"] == 0 and report["applied_steps"] == 2 and report["unchanged"].startswith("no row")


def test_the_report_counts_applied_skipped_and_changed(untrained_world):
    from trust_fast.engine import SKIP_NON_FINITE

    u = TrustUnlearner(copy.deepcopy(untrained_world), "red", TrustConfig(**SMALL, steps=3, min_row_updates=1))
    u.step()
    handle = u.targets[0].module.register_forward_hook(lambda m, a, out: out * float("nan"))
    try:
        assert u.step()["skip_reason"] == SKIP_NON_FINITE
    finally:
        handle.remove()
    u.step()
    u.finalize()
    report = u.report()
    assert (report["steps"], report["applied_steps"], report["skipped_steps"]) == (3, 2, 1)
    assert report["skipped_by_reason"] == {SKIP_NON_FINITE: 1}
    # changed rows, counted independently: rows of the target weights (or bias entries) unlike the original's
    base = dict(untrained_world.unet.named_parameters())
    now = dict(u.unet.named_parameters())
    expected = 0
    for t in u.targets:
        w = f"{t.name}.weight"
        rows = (now[w] != base[w]).reshape(now[w].shape[0], -1).any(1)
        if f"{t.name}.bias" in now:
            rows |= now[f"{t.name}.bias"] != base[f"{t.name}.bias"]
        expected += int(rows.sum())
    assert report["changed_rows"] == expected > 0 and report["unchanged"] is None


def _opt_state(u) -> dict:
    return {k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in st.items()}
            for k, st in u.optimizer.state_dict()["state"].items()}


def test_an_update_that_makes_weights_non_finite_is_rolled_back(untrained_world):
    """The fused Hessian penalty lam * h * (w - w0) overflows with a poisoned diagonal estimate
    once w moved: the update (or its second moment, which would freeze the row) is not finite
    after finite losses and gradients. The step is rolled back
    (weights and optimizer state as before), skipped with its reason, and the run goes on."""
    from trust_fast.engine import SKIP_WEIGHTS

    u = TrustUnlearner(copy.deepcopy(untrained_world), "red",
                       TrustConfig(**SMALL, steps=4, diag_interval=100, loc_interval=100, min_row_updates=1))
    u.step()
    u.step()  # the rows of step 0 again (loc_interval): they have moved from w0 now
    weights, state = [p.detach().clone() for p in u.params], _opt_state(u)
    for d in u.hutchinson.diags:
        d.fill_(3e38)
    u.hessian.set_penalty()
    stats = u.step()
    assert stats["skipped"] and stats["skip_reason"] == SKIP_WEIGHTS
    assert all(torch.equal(p, w) for p, w in zip(u.params, weights))
    now = _opt_state(u)
    assert now.keys() == state.keys()
    for k, st in state.items():
        for n, v in st.items():
            assert torch.equal(now[k][n], v) if isinstance(v, torch.Tensor) else now[k][n] == v, (k, n)
    for d in u.hutchinson.diags:
        d.zero_()
    u.hessian.set_penalty()
    assert not u.step()["skipped"]
    assert all(torch.isfinite(p).all() for p in u.params)
    assert u.report()["skipped_by_reason"] == {SKIP_WEIGHTS: 1}


def test_a_dense_update_to_non_finite_weights_stops_the_run(untrained_world, monkeypatch):
    """A dense optimizer's state is the size of the model, so it is not copied every step: the run
    stops with one line instead of saving the NaN weights."""
    from trust_fast.engine import NonFiniteUpdate
    from trust_fast.methods import config

    u = TrustUnlearner(copy.deepcopy(untrained_world), "red", config("esd", **SMALL, steps=2))
    step = u.optimizer.step

    def poisoned(*a, **kw):
        out = step(*a, **kw)
        with torch.no_grad():
            u.opt_params[0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(u.optimizer, "step", poisoned)
    with pytest.raises(NonFiniteUpdate, match="step 0 made target weights non-finite"):
        u.step()


def test_save_refuses_non_finite_weights_and_warns_about_an_unchanged_model(untrained_world, tmp_path):
    from trust_fast.guard import NonFiniteWeights

    u = TrustUnlearner(copy.deepcopy(untrained_world), "red", TrustConfig(**SMALL, steps=1))
    with pytest.warns(UserWarning, match="saved an unchanged model .*no step was run"):
        u.save(str(tmp_path / "same"))
    with torch.no_grad():
        u.pipe.text_encoder.get_input_embeddings().weight[0, 0] = float("inf")
    before = snapshot(tmp_path)
    with pytest.raises(NonFiniteWeights, match=r"refusing to save a model with non-finite weights \(NaN or Inf in "
                                               r"text_encoder\.\S+\)"):
        u.save(str(tmp_path / "out"))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("make,error,message", [
    (lambda: TrustConfig(batch_size="8"), TypeError, "TrustConfig.batch_size must be int, got '8' (str)"),
    (lambda: TrustConfig(steps=2.5), TypeError, "TrustConfig.steps must be int, got 2.5 (float)"),
    (lambda: TrustConfig(betas=(0.9,)), TypeError, "TrustConfig.betas must be tuple[float, float]"),
    (lambda: TrustConfig(betas=(float("nan"), 0.999)), ValueError, "betas must be in [0, 1)"),
    (lambda: TrustConfig(eps=0.0), ValueError, "eps must be a finite number > 0, got 0.0"),
    (lambda: TrustConfig(mask_fraction=float("nan")), ValueError, "mask_fraction must be in (0, 1], got nan"),
    (lambda: TrustConfig(x0_guidance=float("inf")), ValueError, "x0_guidance must be None or a finite number >= 0"),
    (lambda: TrustConfig(seed=2**70), ValueError, "seed must be in [0, 2**63)"),
    (lambda: TrustConfig(targets=("",)), ValueError, "targets must be None or non-empty glob patterns"),
])
def test_api_configs_of_the_wrong_type_are_refused(make, error, message):
    with pytest.raises(error) as e:
        make().validate()
    assert message in str(e.value)


def test_api_concept_of_the_wrong_type_and_optimizer_numbers(untrained_world):
    from trust_fast.optim import MaskedAdamW

    with pytest.raises(TypeError, match=r"concept must be a str \('A', 'A\+B' or 'A\|B'\) or a ConceptSpec, got 123"):
        TrustUnlearner(untrained_world, concept=123)
    for kw, message in ((dict(lr=float("nan")), "lr must be finite"), (dict(eps=float("nan")), "eps must be finite"),
                        (dict(weight_decay=float("inf")), "weight_decay must be finite"),
                        (dict(lr="1e-3"), "must be numbers")):
        with pytest.raises(ValueError, match=message):
            MaskedAdamW([torch.zeros(2, 2)], **kw)


def test_no_command_writes_a_pipeline_or_patch_with_nan_weights(capsys, tmp_path):
    """export-patch of a model with a NaN, and saving such a pipeline (apply-patch, unlearn, demo and
    world train all write through io.write_pretrained): refused, nothing written."""
    from trust_fast.guard import NonFiniteWeights
    from trust_fast.io import save_pipeline
    from trust_fast.world import load_pipeline, model_path

    model, name = _nan_model(tmp_path)
    refused(capsys, tmp_path, ["export-patch", "--base", model_path("shapes"), "--unlearned", str(model),
                               "--out", str(tmp_path / "q.safetensors")], f"tensor 'unet.{name}::values' holds NaN or Inf")
    nan_base = load_pipeline(str(model), "cpu")
    before = snapshot(tmp_path)
    with pytest.raises(NonFiniteWeights, match=f"refusing to save a model with non-finite weights .*unet.{name}"):
        save_pipeline(nan_base, str(tmp_path / "saved"))
    assert snapshot(tmp_path) == before


def test_patches_that_change_nothing_say_so(capsys, tmp_path):
    from trust_fast.world import model_path

    shapes = model_path("shapes")
    assert main(["export-patch", "--base", shapes, "--unlearned", shapes, "--out", str(tmp_path / "p.safetensors")]) == 0
    assert "warning: the unlearned model's denoiser equals the base's: the patch changes nothing" in capsys.readouterr().err
    assert main(["apply-patch", "--base", "shapes", "--patch", str(tmp_path / "p.safetensors"),
                 "--out", str(tmp_path / "out")]) == 0
    assert "warning: the patch changes no row: the written pipeline equals the base model" in capsys.readouterr().err


def test_a_salun_run_without_a_frozen_copy_still_knows_whether_it_changed_the_model(untrained_world):
    """SalUn keeps no frozen copy to count changed rows against: a digest taken at the start tells."""
    from trust_fast.methods import config

    u = TrustUnlearner(copy.deepcopy(untrained_world), "red", config("salun", **SMALL, steps=1, lr=0.0))
    u.run()
    assert u.report()["changed_rows"] is None
    assert u.unchanged() == "no weight differs from the original model"
    v = TrustUnlearner(copy.deepcopy(untrained_world), "red", config("salun", **SMALL, steps=1))
    v.run()
    assert v.unchanged() is None


# -------------------------------------------------- the independent probe's cases (second round)


@pytest.mark.parametrize("path,value,message", [
    ("config.lr", torch.tensor([1.0, 2.0]), "'config.lr' is a Tensor, not a plain value"),
    ("generator", lambda t: torch.randint(0, 256, t.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
     "'generator' is not a generator state"),
    ("torch_rng", lambda t: torch.randint(0, 256, t.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1)),
     "'torch_rng' is not a generator state"),
    ("optimizer.param_groups.0.weight_decay", 1e30, "optimizer param group 0: weight_decay 1e+30, this run 0.0"),
    ("adversary.optimizers.0.param_groups.0.lr", "abc", "adversary.optimizers[0] param group 0: lr 'abc'"),
])
def test_a_checkpoint_value_of_the_right_type_but_no_run_is_refused(capsys, tmp_path, good_checkpoint, path, value,
                                                                    message):
    state, args = good_checkpoint
    _resume_refused(capsys, tmp_path, _edit(state, path, value), args, message)


@pytest.mark.parametrize("method,edit,message", [
    ("esd", ("optimizer.param_groups.0.amsgrad", True), "optimizer param group 0: amsgrad True, this run False"),
    ("esd", ("optimizer.param_groups.0.lr", "abc"), "optimizer param group 0: lr 'abc', this run 0.001"),
    ("salun", None, "was made from another base model"),
])
def test_dense_method_checkpoints_are_checked_too(untrained_world, tmp_path, method, edit, message):
    """ESD's AdamW hyperparameters came from the checkpoint unchecked (amsgrad True crashed, a
    weight decay of 1e30 saved weights of 1e26), and SalUn, which keeps no frozen copy, resumed
    on another base model without a word."""
    from trust_fast.checkpoint import load_checkpoint, save_checkpoint
    from trust_fast.methods import config

    cfg = config(method, **SMALL, steps=2)
    u = TrustUnlearner(copy.deepcopy(untrained_world), "red", cfg)
    u.step()
    save_checkpoint(u, str(tmp_path / "good"))
    state = torch.load(tmp_path / "good" / "checkpoint.pt", weights_only=True)
    other = copy.deepcopy(untrained_world)
    if edit is not None:
        state = _edit(state, *edit)
    else:
        with torch.no_grad():
            other.unet.conv_in.weight.add_(0.05)
    (tmp_path / "bad").mkdir()
    torch.save(state, tmp_path / "bad" / "checkpoint.pt")
    v = TrustUnlearner(other, "red", cfg)
    weights = [p.detach().clone() for p in v.params]
    with pytest.raises(ValueError, match=message) as e:
        load_checkpoint(v, str(tmp_path / "bad"))
    assert len(str(e.value).splitlines()) == 1
    assert all(torch.equal(p, w) for p, w in zip(v.params, weights)) and v.step_count == 0


@pytest.mark.parametrize("file,key,value,message", [
    ("unet/config.json", "sample_size", -4, "sample_size = -4"),
    ("unet/config.json", "sample_size", 100_000, "sample_size = 100000"),
    ("tokenizer/tokenizer_config.json", "model_max_length", 0, "model_max_length = 0"),
    ("tokenizer/tokenizer_config.json", "model_max_length", 10**9, "model_max_length = 1000000000"),
])
def test_model_sizes_that_would_crash_or_exhaust_memory_are_one_line(capsys, tmp_path, file, key, value, message):
    import json
    import shutil

    from trust_fast.world import model_path

    shutil.copytree(model_path("shapes"), tmp_path / "model")
    path = tmp_path / "model" / file
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    refused(capsys, tmp_path, [*GEN, "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out")], message)


def test_a_deeply_nested_model_index_is_one_line(capsys, tmp_path):
    import shutil

    from trust_fast.world import model_path

    shutil.copytree(model_path("shapes"), tmp_path / "model")
    (tmp_path / "model" / "model_index.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(capsys, tmp_path, [*GEN, "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out")],
            "cannot load model")


@pytest.mark.parametrize("args,message", [
    (["generate", "--prompt", "a red circle", "--n", "1000000000000"], "--n must be at most 10,000"),
    (["evaluate", "--concept", "red", "--n-per-prompt", "1000000000"], "--n-per-prompt must be at most 10,000"),
    (["unlearn", "--concept", "red", "--x0-per-prompt", "1000000000"], "--x0-per-prompt must be at most 10,000"),
    (["unlearn", "--concept", "red", "--adv-prefix", "1000000"], "--adv-prefix must be at most 64"),
])
def test_counts_that_would_exhaust_memory_are_refused_before_any_work(capsys, tmp_path, args, message):
    refused(capsys, tmp_path, [*args, "--out", str(tmp_path / "out")], message)


def test_the_step_api_refuses_what_it_cannot_use(untrained_world, tmp_path):
    u = TrustUnlearner(copy.deepcopy(untrained_world), "red", TrustConfig(**SMALL, steps=1))
    for call, error, message in (
            (lambda: TrustUnlearner(untrained_world, "red", config="trust"), TypeError, "config must be a TrustConfig"),
            (lambda: TrustUnlearner(untrained_world, "red", prompts="x"), TypeError, "prompts must be a PromptSet"),
            (lambda: u.run(steps=-1), ValueError, "run: steps must be an int >= 0, got -1"),
            (lambda: u.run(steps=2.5), ValueError, "run: steps must be an int >= 0, got 2.5"),
            (lambda: u.run(steps=1, checkpoint_every=-1, checkpoint_dir=str(tmp_path)), ValueError,
             "run: checkpoint_every must be an int >= 0"),
            (lambda: u.run(steps=1, checkpoint_every=1), ValueError, "needs a checkpoint_dir"),
            (lambda: u.run(steps=1, eval_interval=-1), ValueError, "run: eval_interval must be an int >= 0"),
            (lambda: u.update("x"), TypeError, "update: forget_loss must be a scalar torch.Tensor"),
            (lambda: u.update(torch.ones(3, requires_grad=True)), ValueError, "must be a scalar, got shape (3,)"),
            (lambda: u.update(torch.tensor(1.0)), ValueError, "forget_loss has no graph to differentiate"),
            (lambda: u.accumulate(1.0), TypeError, "forget_loss must be a scalar torch.Tensor")):
        with pytest.raises(error, match=re.escape(message)):
            call()
    assert u.step_count == 0 and u.skipped_steps == 0
