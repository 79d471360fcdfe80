"""Mutation check: does the test suite notice when the unlearning algorithm breaks?

Each mutant is one small, named edit to the package (a sign flipped, a term dropped, a target taken
from the wrong model). The script copies the repository once to a temporary directory, checks that
the selected tests pass on the unmutated copy, then applies each mutant in turn, runs the tests
chosen to catch it (stopping at the first failure) and restores the file. It prints a table
mutant -> the test that killed it, and exits 1 if any mutant survives (or 2 if a mutant no longer
applies: its code moved, so the list needs updating).

    python scripts/mutants.py                 # every mutant
    python scripts/mutants.py --only esd_sign_flipped retain_gradient_dropped
    python scripts/mutants.py --list
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TERMS = "tests/engine/test_algorithm_terms.py"
BEHAVIOUR = "tests/methods/test_behaviour.py"
ATTACKS = "tests/evaluation/test_attacks.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str       # relative to the repository root
    old: str        # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]
    why: str


MUTANTS = [
    # the five an earlier review found surviving every test
    Mutant("hvp_penalty_removed", "trust_fast/engine/update.py",
           "grads = [g.add_(h, alpha=cfg.lam) for g, h in zip(grads, hv)]", "grads = list(grads)",
           (f"{TERMS}::test_the_hvp_term_adds_exactly_lam_times_the_retain_hessian_times_delta",),
           "the hvp Hessian penalty never reaches the update"),
    Mutant("diag_penalty_removed", "trust_fast/engine/regularizer.py",
           "u.theta0)}, self.config.lam)", "u.theta0)}, 0.0)",
           (f"{TERMS}::test_the_diag_term_enters_the_selected_rows_first_moments_exactly",),
           "the fused Hutchinson penalty is set with lambda 0"),
    Mutant("retain_gradient_dropped", "trust_fast/engine/update.py",
           "grads = [gf.add_(gr, alpha=cfg.alpha) for gf, gr in zip(s.g_f, g_r)]", "grads = s.g_f",
           (f"{TERMS}::test_the_retain_term_adds_exactly_alpha_times_the_retain_gradient",),
           "the retain loss no longer enters the update"),
    Mutant("esd_sign_flipped", "trust_fast/objectives.py",
           "return pred_uncond - eta * (pred_cond - pred_uncond)", "return pred_uncond + eta * (pred_cond - pred_uncond)",
           (f"{TERMS}::test_negative_guidance_points_away_from_the_concept",
            f"{TERMS}::test_forget_targets_come_from_the_original_model"),
           "ESD trains toward the concept"),
    Mutant("save_writes_original_weights", "trust_fast/engine/run.py",
           "        if directory is not None:\n            write_pretrained(self.pipe, directory)",
           "        with torch.no_grad():\n"
           "            for p, p0 in zip(self.params, self.theta0):\n                p.copy_(p0)\n"
           "        if directory is not None:\n            write_pretrained(self.pipe, directory)",
           ("tests/engine/test_resume_and_save.py::test_save_writes_the_in_memory_weights_not_the_originals",),
           "save() writes the original weights"),
    # more, across engine, checkpoint, localize, hessian, optim, objectives, evaluation
    Mutant("anchor_target_from_edited_model", "trust_fast/methods/trust.py",
           "        return u.denoiser.frozen_pred(noisy, t, self.anchors(anchor_cond))",
           "        return u.denoiser.pred(noisy, t, self.anchors(anchor_cond)).detach()",
           (f"{TERMS}::test_forget_targets_come_from_the_original_model",),
           "the anchor target follows the model being edited"),
    Mutant("retain_target_from_edited_model", "trust_fast/engine/update.py",
           "                target = self.frozen_pred(noisy, timesteps, cond)",
           "                target = self.pred(noisy, timesteps, cond).detach()",
           (f"{TERMS}::test_the_retain_term_adds_exactly_alpha_times_the_retain_gradient",),
           "self-distillation against the edited model: the retain gradient vanishes"),
    Mutant("v_prediction_sign", "trust_fast/objectives.py",
           "return a.sqrt() * noise - (1 - a).sqrt() * x0", "return a.sqrt() * noise + (1 - a).sqrt() * x0",
           (f"{TERMS}::test_add_noise_and_the_three_targets_by_hand",),
           "the v-prediction target is wrong"),
    Mutant("add_noise_swapped", "trust_fast/objectives.py",
           "return a.sqrt() * x0 + (1 - a).sqrt() * noise", "return (1 - a).sqrt() * x0 + a.sqrt() * noise",
           (f"{TERMS}::test_add_noise_and_the_three_targets_by_hand",),
           "noising mixes image and noise the wrong way round"),
    Mutant("salun_mask_from_weights", "trust_fast/methods/salun.py",
           "        self.mask = static_mask(sums, self.config.mask_fraction)",
           "        self.mask = static_mask([p.detach() for p in u.params], self.config.mask_fraction)",
           (f"{TERMS}::test_salun_mask_is_the_top_half_of_the_summed_forget_gradient",),
           "SalUn's mask ranks weights instead of the forget gradient"),
    Mutant("resume_forgets_localizer_rows", "trust_fast/methods/trust.py",
           'self.localizer.rows = [r.to(u.device) for r in state["localizer_rows"]]', "pass",
           ("tests/engine/test_resume_and_save.py::test_resumed_run_equals_uninterrupted_run",),
           "a resumed run re-localizes where the interrupted one reused its rows"),
    Mutant("resume_forgets_the_adversary", "trust_fast/engine/adversary.py",
           'adv = state.get("adversary")', "adv = None",
           ("tests/engine/test_resume_and_save.py::test_resumed_run_equals_uninterrupted_run",),
           "a resumed run restarts the adversarial prefix"),
    Mutant("localizer_never_reestimates", "trust_fast/localize.py",
           "if self.rows is None or step % self.interval == 0:", "if self.rows is None:",
           ("tests/test_localize.py::test_dynamic_localizer_reestimates_on_its_interval",),
           "localization is static after the first step"),
    Mutant("finalize_keeps_every_row", "trust_fast/engine/run.py",
           "drop = rows[counts < m]", "drop = rows[counts < 0]",
           ("tests/engine/test_engine.py::test_finalize_resets_rows_updated_fewer_than_min_row_updates",),
           "finalize resets nothing"),
    Mutant("hutchinson_no_running_mean", "trust_fast/hessian.py",
           "[z.tensor(k, hz[k].dtype) for k in idx], None, self.count)",
           "[z.tensor(k, hz[k].dtype) for k in idx], None, 0)",
           ("tests/test_hessian.py::test_hutchinson_diagonal_converges_to_the_true_diagonal",),
           "the Hessian diagonal keeps only the last probe"),
    Mutant("penalty_not_clamped", "trust_fast/ops/reference.py",
           "h = hess[i].reshape(rows_of(p), -1)[r].float().clamp(min=0)", "h = hess[i].reshape(rows_of(p), -1)[r].float()",
           ("tests/ops/test_ops_kernels.py::test_negative_curvature_adds_no_penalty",),
           "the fused penalty pushes weights away where the curvature estimate is negative"),
    Mutant("row_gradients_misaligned", "trust_fast/engine/update.py",
           "return lambda gs: [g.index_select(0, r) for g, r in zip(gs, per_param)]",
           "return lambda gs: [g.index_select(0, r.flip(0)) for g, r in zip(gs, per_param)]",
           (f"{TERMS}::test_the_retain_term_adds_exactly_alpha_times_the_retain_gradient",),
           "the selected rows' gradients land on the wrong rows"),
    Mutant("adamw_no_bias_correction", "trust_fast/ops/reference.py",
           "bc1 = (1 - beta1**t).unsqueeze(1)", "bc1 = torch.ones_like(t).unsqueeze(1)",
           ("tests/optim/test_optim.py::test_matches_per_row_adamw_over_changing_row_sets",),
           "the reference masked AdamW forgets Adam's bias correction"),
    Mutant("ua_counts_the_wrong_images", "trust_fast/evaluation/metrics.py",
           '"ua": sum(shows(spec, p) for p in f_pred)', '"ua": sum(not shows(spec, p) for p in f_pred)',
           ("tests/cli/test_cli.py::test_evaluate_reports_ua_and_retain",),
           "UA counts the images without the concept"),
    Mutant("freeze_nothing", "trust_fast/localize.py",
           "p.requires_grad_(id(p) in keep)", "p.requires_grad_(True)",
           ("tests/engine/test_engine.py::test_masked_steps_touch_only_selected_rows_and_nothing_outside_the_targets",),
           "weights outside the target modules are trainable"),
    Mutant("nonfinite_steps_not_skipped", "trust_fast/engine/update.py",
           "skip = distributed.any_rank(no_forget or not all_finite([forget_loss.detach(), *g_f]))",
           "skip = distributed.any_rank(no_forget)",
           ("tests/test_bad_input.py::test_a_non_finite_forget_loss_alone_skips_the_step",),
           "a NaN forget loss is applied to the weights"),
    # the reliability invariants of #32 (tests/test_invariants.py)
    Mutant("non_finite_update_not_rolled_back", "trust_fast/engine/update.py",
           "                self._undo_update(s.rows, snapshot)", "                pass",
           ("tests/test_invariants.py::test_an_update_that_makes_weights_non_finite_is_rolled_back",),
           "an update that made weights NaN stays in the model"),
    Mutant("non_finite_pipeline_saved", "trust_fast/io.py",
           '    check_finite(pipe, "refusing to save", collective=False)', "    pass",
           ("tests/test_invariants.py::test_save_refuses_non_finite_weights_and_warns_about_an_unchanged_model",),
           "a pipeline with Inf weights is written"),
    Mutant("diverged_run_saved", "trust_fast/engine/report.py",
           "if self.step_count and 2 * bad > self.step_count:", "if False:",
           ("tests/test_invariants.py::test_a_huge_lr_diverges_and_nothing_is_saved",),
           "a run whose steps were all skipped after a 1e30 update saves its weights"),
    Mutant("overwrite_forgets_user_links", "trust_fast/output_files.py",
           "        out += [rel(d) for d in dirs if os.path.islink(os.path.join(root, d))]\n", "",
           ("tests/test_invariants.py::test_overwrite_never_removes_a_link_or_an_empty_directory_the_user_added",),
           "--overwrite removes a symlink to a directory the user put into an earlier output"),
    Mutant("old_markers_vouch_for_everything", "trust_fast/output_files.py",
           "return [] if recognize is not None and recognize(final) else _files(final)", "return []",
           ("tests/test_invariants.py::test_an_old_checkpoint_marker_without_a_file_list_vouches_only_for_checkpoints",),
           "a marker without a file list lets --overwrite delete a user's file"),
    Mutant("negative_second_moment_restored", "trust_fast/optim/state_checks.py",
           '        return "\'exp_avg_sq\' holds a negative second moment"', "        pass",
           ("tests/test_invariants.py::test_a_damaged_checkpoint_field_is_one_line_and_resumes_nothing",),
           "a checkpoint's negative exp_avg_sq is restored (NaN weights after the next step)"),
    # behaviour on the shipped world (tests/methods/test_behaviour.py: held-out prompts, attacks)
    Mutant("retain_gradient_dropped_held_out", "trust_fast/engine/update.py",
           "grads = [gf.add_(gr, alpha=cfg.alpha) for gf, gr in zip(s.g_f, g_r)]", "grads = s.g_f",
           (f"{BEHAVIOUR}::test_pair_is_forgotten_on_held_out_prompts_and_its_parts_kept[red+circle]",),
           "the retain term dropped, seen on held-out prompts: red non-circles lose their red"),
    Mutant("forget_gradient_dropped", "trust_fast/engine/update.py",
           "grads = [gf.add_(gr, alpha=cfg.alpha) for gf, gr in zip(s.g_f, g_r)]",
           "grads = [gf.mul_(0).add_(gr, alpha=cfg.alpha) for gf, gr in zip(s.g_f, g_r)]",
           (f"{BEHAVIOUR}::test_red_is_forgotten_on_held_out_prompts_and_the_rest_kept",),
           "only the retain loss trains: the concept stays on held-out prompts"),
    Mutant("softprompt_attack_no_step", "trust_fast/evaluation/attacks.py",
           "attack_steps, torch.optim.Adam([prefix], lr=lr))",
           "attack_steps, torch.optim.Adam([prefix], lr=0.0))",
           (f"{BEHAVIOUR}::test_softprompt_attack_brings_the_concept_back",),
           "the soft-prompt attack never optimizes its prefix"),
    Mutant("adversary_never_refreshed", "trust_fast/engine/run.py",
           "            self.refresh_adversary()\n", "            pass\n",
           (f"{BEHAVIOUR}::test_adversarial_training_lowers_the_attack",),
           "adv_prefix training runs without its adversary"),
    Mutant("paraphrase_without_synonyms", "trust_fast/evaluation/attacks.py",
           "prompts = world_prompts(spec, templates=held_out, synonyms=True).forget",
           "prompts = world_prompts(spec, templates=held_out, synonyms=False).forget",
           (f"{BEHAVIOUR}::test_paraphrase_attack_reports_what_the_classifier_sees",),
           "the paraphrase attack never paraphrases"),
    Mutant("embedding_attack_no_step", "trust_fast/evaluation/attacks.py",
           "attack_steps, torch.optim.Adam(frees, lr=lr))",
           "attack_steps, torch.optim.Adam(frees, lr=0.0))",
           (f"{ATTACKS}::test_embedding_attack_starts_from_the_prompt_and_frees_every_token_after_the_start",),
           "the embedding attack never moves the prompt's embeddings"),
    Mutant("inversion_word_misplaced", "trust_fast/softprompt.py",
           "    return torch.tensor([ids + [pad] * (length - len(ids))]), len(start) + len(head)",
           "    return torch.tensor([ids + [pad] * (length - len(ids))]), len(head)",
           (f"{ATTACKS}::test_inversion_learns_one_word_placed_at_the_concept_in_every_prompt",),
           "the inversion attack's learned word replaces the token before the concept's"),
    Mutant("inversion_attack_no_step", "trust_fast/evaluation/attacks.py",
           "loss = minimize([v], batch_loss, attack_steps, torch.optim.Adam([v], lr=lr))",
           "loss = minimize([v], batch_loss, attack_steps, torch.optim.Adam([v], lr=0.0))",
           (f"{ATTACKS}::test_inversion_learns_one_word_placed_at_the_concept_in_every_prompt",),
           "the inversion attack never learns its word"),
    Mutant("adv_token_offsets_ignored", "trust_fast/softprompt.py",
           "out[:, at:] + piece[:, :out.shape[1] - at].to(out)], 1)",
           "out[:, at:] + 0 * piece[:, :out.shape[1] - at].to(out)], 1)",
           ("tests/engine/test_engine.py::test_token_offset_adversary_lowers_the_attack_loss_per_prompt",),
           "adv_mode='tokens': the offsets never reach the text encoder (no adversary)"),
    # FSDP2 (trust_fast/fsdp.py)
    Mutant("fsdp_scores_not_gathered", "trust_fast/fsdp.py",
           "scores = self.gather_scores(ops.row_saliency(grads, weights, mode))",
           "scores = ops.row_saliency(grads, weights, mode)",
           ("tests/test_fsdp.py::test_sharded_run_selects_and_trains_like_data_parallel",),
           "each rank selects among its own rows only (z-scores of half a layer)"),
    Mutant("fsdp_rows_not_offset", "trust_fast/fsdp.py",
           "out.append(r[keep] - start)", "out.append(r[keep])",
           ("tests/test_fsdp.py::test_sharded_run_selects_and_trains_like_data_parallel",),
           "a rank trains its shard's rows at the whole layer's indices"),
    Mutant("fsdp_fd_probe_not_shifted", "trust_fast/engine/regularizer.py",
           "(p + eps * z.tensor(i, p.dtype) for i, p in enumerate(u.params))",
           "(p + 0 * z.tensor(i, p.dtype) for i, p in enumerate(u.params))",
           ("tests/test_fsdp.py::test_sharded_hessian_steps_checkpoint_resume_and_save",),
           "the finite-difference Hessian products see unshifted weights (H z = 0)"),
    Mutant("fsdp_frozen_pass_uses_trained_weights", "trust_fast/engine/unlearner.py",
           "self.sharding.swapped(self.params, self.theta0, self._edited_rows())",
           "self.sharding.swapped(self.params, self.params, self._edited_rows())",
           ("tests/test_fsdp.py::test_sharded_run_selects_and_trains_like_data_parallel",),
           "the frozen model's targets are the edited weights under FSDP2"),
    Mutant("fsdp_probe_frozen_pass_rows_not_widened", "trust_fast/fsdp.py",
           "rows = [None if id(p) in _WHOLE else r for p, r in zip(params, rows)]", "rows = list(rows)",
           ("tests/test_fsdp.py::test_finite_difference_hessian_products_match_double_backward",),
           "a frozen pass inside a finite-difference probe restores only the edited rows (the target moves "
           "with the probe, H z ~ 0)"),
    Mutant("fsdp_frozen_pass_swaps_no_rows", "trust_fast/optim/masked_adamw.py",
           'return st["row_of_slot"][: st["num_slots"]]', 'return st["row_of_slot"][:0]',
           ("tests/test_fsdp.py::test_sharded_run_selects_and_trains_like_data_parallel",),
           "MaskedAdamW.edited_rows reports no rows: FSDP2's frozen passes keep the edited weights"),
    Mutant("retain_cache_ignores_its_count", "trust_fast/engine/data.py",
           'return cfg.x0_retain_per_prompt if name == "retain"',
           'return cfg.x0_per_prompt if name == "retain"',
           ("tests/engine/test_engine.py::test_the_retain_cache_can_hold_fewer_images_per_prompt",),
           "the retain prompts' cache ignores x0_retain_per_prompt (as many images as the forget prompts)"),
    Mutant("checkpoint_reads_a_predated_field_as_today", "trust_fast/checkpoint.py",
           "**PREDATED_FIELDS, **state[\"config\"]", "**state[\"config\"]",
           ("tests/test_checkpoint.py::test_a_checkpoint_from_before_a_field_reads_as_what_the_code_did_then",),
           "a checkpoint without a later field reads it as today's default, not as what the code did then"),
    # the leak scan and partial prompts (#34)
    Mutant("partial_prompts_train_on_their_own_images", "trust_fast/engine/data.py",
           "return getattr(self, kind) if own is None else own", "return getattr(self, kind)",
           ("tests/engine/test_engine.py::test_partial_prompts_train_on_the_whole_concepts_images",),
           "a partial prompt's pool is sampled from its own prompt (\"a red\" draws red circles a third of the "
           "time), not from the whole concept's"),
    Mutant("partial_retain_target_from_its_own_prompt", "trust_fast/engine/data.py",
           "        if self.emb.retain_images is None:\n            return None",
           "        if True:\n            return None",
           ("tests/engine/test_engine.py::test_partial_prompts_train_on_the_whole_concepts_images",),
           "a partial retain entry is distilled toward its own prompt (\"a red\" pulled back toward red circles)"),
    Mutant("partial_fraction_ignored", "trust_fast/engine/data.py",
           "        if not self.partial.numel() or not self.whole.numel():",
           "        if True:",
           ("tests/engine/test_engine.py::test_partial_prompts_train_on_the_whole_concepts_images",),
           "forget batches draw uniformly over all entries: the partial prompts crowd out the whole concept's"),
    Mutant("partial_anchor_keeps_the_concept", "trust_fast/world/concepts.py",
           "                target = _other(d, changed, k)",
           "                target = d",
           ("tests/world/test_world_concepts.py::test_partial_prompts_map_the_whole_concept_to_a_changed_part_and_keep_the_rest",),
           "partial prompts are mapped onto the concept itself (their anchors change nothing)"),
    Mutant("leak_scan_counts_the_wrong_images", "trust_fast/evaluation/leak.py",
           "hits = [shows(spec, a) for a in", "hits = [not shows(spec, a) for a in",
           ("tests/evaluation/test_leak.py::test_the_worst_description_is_found",),
           "the leak scan counts the images without the concept"),
    Mutant("leak_max_over_the_wrong_table", "trust_fast/evaluation/leak.py",
           "worst_desc = max(desc, key=lambda key: (desc[key][\"rate\"], desc[key][\"k\"]))",
           "worst_desc = min(desc, key=lambda key: (desc[key][\"rate\"], desc[key][\"k\"]))",
           ("tests/evaluation/test_leak.py::test_the_worst_description_is_found",),
           "leak_max is the least leaking description"),
]


def _copy_repo(dst: str) -> None:
    skip = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", ".pytest_cache", ".benchmarks",
                                  ".hypothesis", "benchmarks", "docs", "csrc")
    shutil.copytree(ROOT, dst, ignore=skip, dirs_exist_ok=True)


def _pytest(copy: str, tests: tuple[str, ...], timeout: int) -> tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=copy, TQDM_DISABLE="1")
    t0 = time.monotonic()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider", *tests],
                           cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        return r.returncode, r.stdout + r.stderr, time.monotonic() - t0
    except subprocess.TimeoutExpired:
        return -1, "timeout", time.monotonic() - t0


def _killer(output: str) -> str:
    m = re.search(r"^FAILED (\S+)", output, re.M)
    return m.group(1).split(" - ")[0] if m else "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="run only these mutants")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per mutant")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(args.only):
        print(f"unknown mutant(s): {sorted(set(args.only) - {m.name for m in MUTANTS})}", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name:32s} {m.file:36s} {m.why}")
        return 0
    with tempfile.TemporaryDirectory(prefix="trust-fast-mutants-") as copy:
        _copy_repo(copy)
        check = subprocess.run([sys.executable, "-c", "import trust_fast; print(trust_fast.__file__)"], cwd=copy,
                               env=dict(os.environ, PYTHONPATH=copy), capture_output=True, text=True)
        if not check.stdout.strip().startswith(copy):
            print(f"the copy does not import its own package: {check.stdout or check.stderr}", file=sys.stderr)
            return 2
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        rc, out, secs = _pytest(copy, tests, args.timeout * 2)
        if rc != 0:
            print(f"the unmutated copy fails its tests ({secs:.0f} s):\n{out[-3000:]}", file=sys.stderr)
            return 2
        print(f"unmutated: {len(tests)} test selections pass ({secs:.0f} s)")
        rows, survivors, stale = [], [], []
        for m in chosen:
            path = os.path.join(copy, m.file)
            text = open(path, encoding="utf-8").read()
            if text.count(m.old) != 1:
                stale.append(m.name)
                rows.append((m.name, "does not apply (code moved)", 0.0))
                continue
            with open(path, "w", encoding="utf-8") as f:
                f.write(text.replace(m.old, m.new))
            try:
                rc, out, secs = _pytest(copy, m.tests, args.timeout)
            finally:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
            if rc == 1:
                rows.append((m.name, _killer(out), secs))
            else:
                survivors.append(m.name)
                rows.append((m.name, "SURVIVED" if rc == 0 else f"pytest exit {rc}", secs))
            print(f"  {m.name}: {rows[-1][1]} ({secs:.0f} s)", flush=True)
    print("\n| mutant | what it breaks | killed by | s |\n| --- | --- | --- | --- |")
    why = {m.name: m.why for m in MUTANTS}
    for name, killer, secs in rows:
        print(f"| `{name}` | {why[name]} | `{killer}` | {secs:.0f} |")
    if stale:
        print(f"\nno longer apply: {', '.join(stale)}", file=sys.stderr)
        return 2
    if survivors:
        print(f"\nsurvived: {', '.join(survivors)}", file=sys.stderr)
        return 1
    print(f"\nall {len(rows)} mutants killed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
