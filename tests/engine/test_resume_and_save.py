"""Resume and output paths checked against expectations computed outside the code under test.

- Resume: for every engine mode (TRUST's default Hessian diagonal, the exact HVP, re-localization
  every 3 steps, the adversarial soft prefix, SalUn, ESD) a run interrupted after k steps,
  checkpointed, loaded into a fresh unlearner built on a fresh copy of the base model and run to
  the end gives the same UNet, bit for bit, as the same run done in one go.
- Output: ``TrustUnlearner.save``, ``export_patch`` + ``apply_patch`` and ``trust-fast unlearn``
  write what the run holds in memory (and it is not the base model); the CLI's
  ``weights_sha256`` is recomputed here with hashlib from the saved tensors.
- ``finalize()``: the rows it resets are found by diffing weight snapshots step by step, and the
  original weights come from the untouched base pipeline, not from the engine's own counters or
  its copy of the original weights.

Everything runs on the untrained tiny world pipeline with a handful of prompts (sampling the
data-free image cache costs one UNet evaluation per prompt per DDIM step), a batch of 2, 3-4
steps and one intra-op thread, so the file stays cheap on a small shared CPU.
"""
import copy
import fnmatch
import hashlib
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from helpers import small, tiny_args
from trust_fast import TrustConfig, TrustUnlearner, methods
from trust_fast.checkpoint import load_checkpoint, save_checkpoint
from trust_fast.concepts import PromptSet

# two forget prompts with their anchors (the concept swapped for another colour) and three retain prompts:
# the data-free cache is 7 images, so building an unlearner's cache costs a few UNet evaluations
PROMPTS = PromptSet(forget=["a plain red circle", "a striped red square"],
                    anchors=["a plain green circle", "a striped blue square"],
                    retain=["a plain green circle", "a striped yellow triangle", ""])
TINY = small(batch=2, x0_steps=1)
# TRUST's defaults (dynamic rows, Hessian diagonal) with probes folded in at steps 0 and 2, so a
# resume at step 1 continues from a restored estimate (count 1) and folds the next probe into it;
# min_row_updates 2 so finalize() resets the rows updated once and keeps the others
DIAG = dict(diag_interval=2, min_row_updates=2, steps=3)
DIAG_RESUME_AT = 1


def diag_config() -> TrustConfig:
    return TrustConfig(**DIAG, **TINY)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread while this module runs. On a small machine shared with other jobs, two
    OpenMP threads that must meet at every op's barrier made a step here 10-50x slower than one
    thread (measured: a 2-step SalUn run, 0.7 s on one thread, 34 s on two). Both runs of every
    comparison use the same thread count, so bit-identity is unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def unlearner(base, config: TrustConfig) -> TrustUnlearner:
    return TrustUnlearner(copy.deepcopy(base), "red", config, prompts=PROMPTS)


def target_names(u) -> list[str]:
    """Names (in the UNet's state dict) of the target parameters, weight then bias per target."""
    return [f"{t.name}.{kind}" for t in u.targets for kind, p in (("weight", t.weight), ("bias", t.bias))
            if p is not None]


def unet_state(pipe) -> dict:
    return {n: t.detach().clone() for n, t in pipe.unet.state_dict().items()}


def stepped_with_snapshots(untrained_world):
    """TRUST with its defaults stepped DIAG["steps"] times by hand (not finalized), and the UNet's
    weights before the first step and after every step."""
    torch.manual_seed(0)
    u = unlearner(untrained_world, diag_config())
    snaps = [unet_state(u.pipe)]
    for _ in range(DIAG["steps"]):
        u.step()
        snaps.append(unet_state(u.pipe))
    return u, snaps


@pytest.fixture(scope="module")
def diag_run(untrained_world):
    """TRUST with its defaults run for DIAG["steps"] steps in one go, the UNet's weights snapshotted
    before the first step and after every step, then finalized. Shared by the resume, save, patch
    and finalize tests (none of which changes it)."""
    u, snaps = stepped_with_snapshots(untrained_world)
    info = u.finalize()
    return SimpleNamespace(u=u, snaps=snaps, info=info, final=unet_state(u.pipe))


# ----------------------------------------------------------------------------------------- resume

def resumed_run(base, make_config, k: int, directory) -> TrustUnlearner:
    """k steps on one copy, save_checkpoint, then a fresh unlearner on a fresh copy of the base
    loads it and runs the remaining steps through run() (which finalizes at config.steps)."""
    torch.manual_seed(0)
    part = unlearner(base, make_config())
    part.run(steps=k)
    assert part.step_count == k and part.finalized is None
    save_checkpoint(part, str(directory))
    del part
    torch.manual_seed(12345)  # the resuming process starts from another global RNG state
    res = unlearner(base, make_config())
    assert load_checkpoint(res, str(directory)) == k
    res.run(steps=res.config.steps - k)
    return res


def assert_same_run(ref: TrustUnlearner, res: TrustUnlearner, base) -> None:
    n = ref.config.steps
    assert ref.step_count == res.step_count == n
    assert ref.skipped_steps == res.skipped_steps == 0
    assert ref.finalized is not None and res.finalized == ref.finalized
    # the same batches and losses at every step, restored ones included
    def per_step(u):
        return [(s["step"], s["loss_forget"], s["loss_retain"], s["selected_rows"]) for s in u.history.steps]

    assert per_step(res) == per_step(ref)
    a, b = unet_state(ref.pipe), unet_state(res.pipe)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # not a trivial pass: the run changed the model
    orig = base.unet.state_dict()
    assert any(not torch.equal(a[name], orig[name]) for name in target_names(ref))


RESUME_MODES = {
    # exact Hessian-vector products at every step after the first: steps 1 and 2, after the resume
    "hvp": (lambda: TrustConfig(hessian="hvp", hvp_interval=1, min_row_updates=1, steps=3, **TINY), 1),
    # rows estimated at step 0, reused at steps 1 and 2 (step 2 after the resume), re-estimated at step 3
    "loc_interval_3": (lambda: TrustConfig(loc_interval=3, min_row_updates=1, steps=4, **TINY), 2),
    # prefix made at step 0; step 1 trains on the restored prefixed prompts, step 2 refreshes the
    # restored prefix with the restored Adam state
    "adv_prefix": (lambda: TrustConfig(adv_prefix=2, adv_steps=2, adv_interval=2, min_row_updates=1, steps=3,
                                       **TINY), 1),
    # static mask computed before step 0 and restored, dense Adam over the whole UNet
    "salun": (lambda: methods.config("salun", steps=3, **TINY), 1),
    # partial prompts derived from the words: their pool sampled from the whole prompts' conditioning
    "partial": (lambda: TrustConfig(partial_prompts="on", min_row_updates=1, steps=3, **TINY), 1),
    # dense Adam over attn2, negative guidance, no retain term
    "esd": (lambda: methods.config("esd", steps=3, **TINY), 1),
}


@pytest.mark.parametrize("mode", list(RESUME_MODES))
def test_resumed_run_equals_uninterrupted_run(untrained_world, tmp_path, mode):
    make_config, k = RESUME_MODES[mode]
    torch.manual_seed(0)
    ref = unlearner(untrained_world, make_config())
    ref.run()
    res = resumed_run(untrained_world, make_config, k, tmp_path / "ckpt")
    assert_same_run(ref, res, untrained_world)
    if mode == "adv_prefix":
        assert ref.adv_prefixes and torch.equal(res.adv_prefixes[0], ref.adv_prefixes[0])
        assert torch.equal(res.emb_forget_adv[0], ref.emb_forget_adv[0])
    if mode == "salun":
        assert all(torch.equal(a, b) for a, b in zip(ref.mask, res.mask))
    if ref.localizer is not None:
        assert ref.finalized["rows_kept"] > 0


def test_resumed_default_trust_run_equals_uninterrupted_run(untrained_world, diag_run, tmp_path):
    """TRUST's defaults (Hessian diagonal), min_row_updates 2: the resumed run must also carry the
    per-row update counts across the checkpoint for finalize() to reset the same rows."""
    res = resumed_run(untrained_world, diag_config, DIAG_RESUME_AT, tmp_path / "ckpt")
    assert_same_run(diag_run.u, res, untrained_world)
    assert diag_run.info["rows_reset"] > 0 and diag_run.info["rows_kept"] > 0
    assert res.hutchinson.count == diag_run.u.hutchinson.count == 2
    assert all(torch.equal(a, b) for a, b in zip(res.hutchinson.diags, diag_run.u.hutchinson.diags))


# ------------------------------------------------------------------------------------------ output

def test_save_writes_the_in_memory_weights_not_the_originals(untrained_world, diag_run, tmp_path):
    from trust_fast.world import load_pipeline

    u = diag_run.u
    before = unet_state(u.pipe)
    out = tmp_path / "out"
    u.save(str(out))
    saved = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    now = u.pipe.unet.state_dict()
    assert saved.keys() == now.keys() == before.keys()
    for name in saved:
        assert torch.equal(saved[name], now[name]), name
        assert torch.equal(saved[name], before[name]), name      # save() did not change the model either
        assert torch.equal(saved[name], diag_run.final[name]), name
    orig = untrained_world.unet.state_dict()
    changed = [n for n in target_names(u) if not torch.equal(saved[n], orig[n])]
    assert changed, "the saved UNet is the original one"
    assert all(torch.equal(saved[n], orig[n]) for n in saved if n not in set(target_names(u)))
    # the directory loads back as a pipeline with those weights
    loaded = load_pipeline(str(out), "cpu").unet.state_dict()
    assert all(torch.equal(loaded[n], saved[n]) for n in saved)


def changed_rows(base: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Rows (dim 0; elements of a 1-D tensor) where `new` differs from `base`."""
    if base.dim() == 0:
        return torch.zeros(0 if torch.equal(base, new) else 1, dtype=torch.int64)
    return (base.reshape(base.shape[0], -1) != new.reshape(new.shape[0], -1)).any(1).nonzero().flatten()


def test_patch_rebuilds_the_unlearned_weights_bit_for_bit(untrained_world, diag_run, tmp_path):
    from trust_fast.patch import apply_patch, export_patch

    u = diag_run.u
    path = str(tmp_path / "red.safetensors")
    stats = export_patch(untrained_world, u.pipe, path)
    orig, new = untrained_world.unet.state_dict(), u.pipe.unet.state_dict()
    diff = {n: r for n, r in ((n, changed_rows(orig[n], new[n])) for n in orig) if r.numel()}
    assert diff and stats["changed_rows"] == sum(r.numel() for r in diff.values()) > 0
    # the patch holds exactly the rows that differ, with the unlearned values
    tensors = load_file(path)
    assert {k.rsplit("::", 1)[0] for k in tensors} == {f"unet.{n}" for n in diff}
    for n, rows in diff.items():
        assert torch.equal(tensors[f"unet.{n}::rows"], rows), n
        assert torch.equal(tensors[f"unet.{n}::values"], new[n].reshape(new[n].shape[0], -1)[rows]), n
    rebuilt = apply_patch(copy.deepcopy(untrained_world), path)
    for comp in ("unet", "text_encoder"):
        want, got = getattr(u.pipe, comp).state_dict(), getattr(rebuilt, comp).state_dict()
        assert want.keys() == got.keys()
        for n in want:
            assert torch.equal(got[n], want[n]), f"{comp}.{n}"


def test_cli_unlearn_writes_the_weights_its_report_describes(shapes_pipe, tmp_path):
    from trust_fast.cli import main

    out = tmp_path / "out"
    assert main(["unlearn", "--concept", "red", "--steps", "3", "--min-row-updates", "1", "--no-eval",
                 *tiny_args(), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 3 and report["skipped_steps"] == 0
    saved = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    shipped = shapes_pipe.unet.state_dict()
    assert saved.keys() == shipped.keys()
    # the target parameters in the engine's order: modules matching the patterns in model order,
    # each weight then its bias
    patterns = report["target_patterns"]  # the resolved patterns (config "targets" None: the family's)
    names = []
    for mod_name, mod in shapes_pipe.unet.named_modules():
        if "weight" in mod._parameters and any(fnmatch.fnmatchcase(mod_name, p) for p in patterns):
            names += [f"{mod_name}.{k}" for k in ("weight", "bias") if mod._parameters.get(k) is not None]
    assert names
    rows = {n: changed_rows(shipped[n], saved[n]) for n in names}
    assert sum(r.numel() for r in rows.values()) > 0, "the written UNet is the shipped one"
    assert all(torch.equal(saved[n], shipped[n]) for n in saved if n not in set(names))
    # rows of a target = weight rows or bias elements that changed; each kept row is one the run updated
    kept = sum(torch.cat([rows[f"{m}.weight"], rows.get(f"{m}.bias", torch.zeros(0, dtype=torch.int64))])
               .unique().numel() for m in {n.rsplit(".", 1)[0] for n in names})
    assert kept == report["finalized"]["rows_kept"]
    h = hashlib.sha256()
    for n in names:
        h.update(saved[n].contiguous().numpy().tobytes())
    assert report["weights_sha256"] == h.hexdigest()


# ---------------------------------------------------------------------------------------- finalize

def finalize_expectation(targets, snaps: list[dict], orig: dict, m: int):
    """What finalize() must leave, derived from weight snapshots (before the first step and after
    every step) and the untouched base weights: a row's count is the number of steps in which its
    weight row or bias element changed; rows with 0 < count < m go back to `orig`, the others keep
    their trained values. Returns (expected state of the target parameters, rows seen changing,
    rows to reset, rows kept)."""
    trained, want = snaps[-1], {}
    n_changed = n_reset = n_kept = 0
    for t in targets:
        kinds = ["weight"] + (["bias"] if t.bias is not None else [])
        count = torch.zeros(t.rows, dtype=torch.int64)
        for before, after in zip(snaps, snaps[1:]):
            moved = torch.zeros(t.rows, dtype=torch.bool)
            for kind in kinds:
                n = f"{t.name}.{kind}"
                moved |= (before[n].reshape(t.rows, -1) != after[n].reshape(t.rows, -1)).any(1)
            count += moved
        reset = (count > 0) & (count < m)
        n_changed += int((count > 0).sum())
        n_reset += int(reset.sum())
        n_kept += int((count >= m).sum())
        for kind in kinds:
            n = f"{t.name}.{kind}"
            want[n] = torch.where(reset.view(-1, *[1] * (orig[n].dim() - 1)), orig[n], trained[n])
            # rows never seen changing are the original ones before finalize too
            assert torch.equal(trained[n][count == 0], orig[n][count == 0]), n
    return want, n_changed, n_reset, n_kept


def test_finalize_resets_exactly_the_rows_seen_changing_in_fewer_than_min_row_updates_steps(untrained_world,
                                                                                             diag_run):
    """Adds independence to test_engine.py::test_finalize_resets_rows_updated_fewer_than_min_row_updates,
    which takes the per-row update counts from the optimizer (MaskedAdamW.row_updates) and the
    originals from the engine's own copy (theta0), and checks weight rows only. Here a row's count
    is the number of steps in which its weights (the weight row or the bias element) were seen to
    change, from snapshots before and after every step, and the originals are the untouched base
    pipeline's: a wrong counter in the optimizer, a bias left edited, or a corrupted theta0 fails here."""
    u, m = diag_run.u, DIAG["min_row_updates"]
    orig = untrained_world.unet.state_dict()
    want, n_changed, n_reset, n_kept = finalize_expectation(u.targets, diag_run.snaps, orig, m)
    assert n_reset > 0 and n_kept > 0          # the test means something: some rows go, some stay
    for n, w in want.items():
        assert torch.equal(diag_run.final[n], w), n
    assert diag_run.info["rows_ever_updated"] == n_changed
    assert diag_run.info["rows_reset"] == n_reset
    assert diag_run.info["rows_kept"] == n_kept == n_changed - n_reset
    # nothing outside the targets ever moved
    assert all(torch.equal(diag_run.final[n], orig[n]) for n in orig if n not in want)


def test_save_of_an_unfinished_run_writes_the_finalized_weights(untrained_world, tmp_path):
    """A run stepped by hand (run() never reached config.steps, so nothing finalized it) and saved:
    save() finalizes first, so the file holds the weights finalize_expectation derives from the
    snapshots, not the raw trained ones."""
    u, snaps = stepped_with_snapshots(untrained_world)
    assert u.finalized is None
    orig = untrained_world.unet.state_dict()
    want, _, n_reset, n_kept = finalize_expectation(u.targets, snaps, orig, DIAG["min_row_updates"])
    assert n_reset > 0 and n_kept > 0
    u.save(str(tmp_path / "out"))
    saved = load_file(str(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors"))
    for n in saved:
        assert torch.equal(saved[n], want.get(n, orig[n])), n
    assert u.finalized is not None and u.finalized["rows_reset"] == n_reset
