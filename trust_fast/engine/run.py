"""The loop over steps (step, run with evaluation, logging and checkpoints), the end of a run
(finalize, the report, saving) and the unlearner's state as a collection of its components'. A
mixin of :class:`~trust_fast.engine.TrustUnlearner`."""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import asdict

import torch
from torch import Tensor

from .. import distributed
from .accumulate import RetainParts


class RunDiverged(ValueError):
    """Most steps of the run were skipped for non-finite values: its weights are not saved."""


class RunMixin:
    # -------------------------------------------------------------------- step

    def step(self) -> dict:
        """One unlearning step on data-free batches. Returns losses, selected rows and timings:
        step, loss_forget, loss_retain, selected_rows, selected_fraction, seconds and time_* phases."""
        if self.unsharded:
            raise RuntimeError("this FSDP2 run ended with unshard(): its denoiser was gathered for saving")
        self.prepare()
        cfg = self.config
        self.finalized = None
        t0 = time.perf_counter()
        if cfg.adv_prefix and self.step_count % cfg.adv_interval == 0:
            self.refresh_adversary()
        t_adv = time.perf_counter() - t0
        fb = self.forget_batch(cfg.batch_size)
        use_retain = cfg.retain_objective != "none" and cfg.alpha > 0
        rb = self.retain_batch(cfg.retain_batch_size) if use_retain else None
        # one frozen forward for the anchor targets of the forget batch and the distillation
        # targets of the retain batch
        f_target = r_target = None
        # a retain entry with an image source (a partial prompt) is distilled toward the frozen model on it
        r_cond = None if rb is None else (rb.cond if rb.anchor is None else rb.anchor)
        if cfg.forget_objective == "anchor" and use_retain and cfg.retain_objective == "distill":
            both = self.frozen_pred(torch.cat([fb.noisy, rb.noisy]), torch.cat([fb.t, rb.t]),
                                    torch.cat([fb.anchor, r_cond]))
            f_target, r_target = both.split([fb.noisy.shape[0], rb.noisy.shape[0]])
        elif use_retain and cfg.retain_objective == "distill" and rb.anchor is not None:
            r_target = self.frozen_pred(rb.noisy, rb.t, r_cond)
        loss_f = self.forget_loss(fb.noisy, fb.t, fb.cond, fb.anchor, target=f_target)
        # the retain pass runs once the forget gradient is taken and its graph freed; on steps that
        # differentiate it twice, a micro-batch at a time
        loss_r = None
        if rb:
            def part(sl: slice = slice(None)) -> Tensor:
                return self.retain_loss(rb.noisy[sl], rb.t[sl], rb.cond[sl], target=None if r_target is None
                                        else r_target[sl], x0=rb.x0[sl], noise=rb.noise[sl])
            n, size = rb.noisy.shape[0], cfg.hessian_micro_batch
            micro = 0 < size < n and self.hessian.now(self.step_count) and self.sharding is None
            loss_r = RetainParts(part, n, size) if micro else part
        t1 = time.perf_counter()
        stats = self.update(loss_f, loss_r)
        stats["time_forward"] = t1 - t0 - t_adv + stats.pop("time_retain_forward")
        stats["time_adversary"] = t_adv
        stats["seconds"] = time.perf_counter() - t0
        self.record.seconds += stats["seconds"]
        self.history.steps.append(stats)
        return stats

    def run(self, steps: int | None = None, progress: bool = False, eval_fn=None, eval_interval: int = 0,
            checkpoint_dir: str | None = None, checkpoint_every: int = 0,
            overwrite_checkpoint: bool = False, log_fn=None) -> list[dict]:
        """Run `steps` steps (default config.steps). With `eval_fn(unlearner) -> dict` and
        `eval_interval` > 0, evaluate every eval_interval steps and at the end (history.evals).
        With `log_fn(kind, step, values)`, every step's stats (kind "step") and every evaluation
        (kind "eval") are also handed to it (e.g. :class:`trust_fast.tblog.TensorBoardLog`).
        With `checkpoint_dir` and `checkpoint_every` > 0, write a checkpoint every that many steps
        (counted from step 0, so a resumed run keeps the same cadence; see trust_fast.checkpoint).
        The directory is claimed for the run (trust_fast.io.claim_output): a checkpoint of another
        run in it is replaced only with `overwrite_checkpoint` or when this run resumed from it."""
        from tqdm.auto import tqdm

        steps = self.config.steps if steps is None else steps
        for name, value in (("steps", steps), ("eval_interval", eval_interval), ("checkpoint_every", checkpoint_every)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"run: {name} must be an int >= 0, got {value!r}")
        if checkpoint_every > 0 and checkpoint_dir is None:
            raise ValueError("run: checkpoint_every > 0 needs a checkpoint_dir to write the checkpoints to")
        end = self.step_count + steps
        checkpoints = checkpoint_dir is not None and checkpoint_every > 0
        with contextlib.ExitStack() as stack:
            if checkpoints:
                from ..checkpoint import claim_checkpoint_dir

                stack.enter_context(claim_checkpoint_dir(
                    checkpoint_dir, overwrite=overwrite_checkpoint or self.resumed_from == os.path.realpath(checkpoint_dir),
                    inputs=[("source model", self.source_path())]))
            self.prepare(progress)
            bar = tqdm(range(steps), desc=f"{self.config.method} {self.concept or ''}".strip(), disable=not progress)
            out = []
            for _ in bar:
                s = self.step()
                out.append(s)
                bar.set_postfix(forget=f"{s['loss_forget']:.4f}", rows=s["selected_rows"])
                done = self.step_count
                if log_fn is not None:
                    log_fn("step", done, s)
                if eval_fn is not None and eval_interval > 0 and (done % eval_interval == 0 or done == end):
                    self.history.evals.append({"step": done, **eval_fn(self)})
                    if log_fn is not None:
                        log_fn("eval", done, self.history.evals[-1])
                if checkpoints and done % checkpoint_every == 0:
                    self._checkpoint(checkpoint_dir, done)
        if self.step_count >= self.config.steps:
            self.finalize()
        return out

    def _checkpoint(self, directory: str, step: int) -> None:
        """A checkpoint that cannot be written (disk full, directory gone) costs the run nothing but
        that checkpoint: warn in one line and try again at the next interval."""
        from ..checkpoint import save_checkpoint

        try:
            save_checkpoint(self, directory)
        except OSError as e:
            self.record.failed_checkpoints.append(step)
            warnings.warn(f"could not write the checkpoint of step {step} to {directory!r} "
                          f"({e.strerror or e}); training goes on, the next interval tries again", stacklevel=2)

    @torch.no_grad()
    def finalize(self) -> dict:
        """Consolidate the edit at the end of a run: every row that dynamic localization updated in
        fewer than ``config.min_row_updates`` steps goes back to its original weights (bias
        included). Such rows were salient once or twice and carry little of the erasure; dropping
        them halves the rows an unlearned model differs in (so the sparse patch) without a measured
        cost: on "circle", 612 -> 320 rows with UA and retain accuracy unchanged. Called by
        :meth:`run` when the configured steps are done and by :meth:`save`; idempotent until the
        next step. A no-op for dense methods (SalUn, ESD) and for min_row_updates 1."""
        if self.finalized is not None:
            return self.finalized
        changed = reset = 0
        m = self.config.min_row_updates
        if self.localization.sparse and self.theta0 is not None:
            pos = {id(p): k for k, p in enumerate(self.params)}
            master = self.precision.master
            for t in self.targets:
                rows, counts = self.masked_optimizer.row_updates(self.opt_params[pos[id(t.weight)]])
                drop = rows[counts < m]
                changed += rows.numel()
                reset += drop.numel()
                if drop.numel():
                    for p in t.params:
                        p[drop] = self.theta0[pos[id(p)]][drop].to(p.dtype)
                        if master is not None:
                            master[pos[id(p)]][drop] = self.theta0[pos[id(p)]][drop].float()
        self.finalized = {"rows_ever_updated": changed, "rows_reset": reset, "rows_kept": changed - reset,
                          "min_row_updates": m}
        return self.finalized

    # ------------------------------------------------------------------ output

    def state_bytes(self) -> dict:
        """Memory the engine holds beyond the model: optimizer state, frozen target copies,
        Hessian diagonal, cached images, static mask."""
        opt = self.optimizer
        if hasattr(opt, "state_bytes"):
            opt_bytes = opt.state_bytes()
        else:
            opt_bytes = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                            if isinstance(v, Tensor))
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        h = self.hessian.hutchinson
        return {"optimizer_state_bytes": opt_bytes,
                "frozen_copy_bytes": nbytes(self.theta0 or []),
                "amp_weights_bytes": nbytes((self.denoiser.amp_weights or {}).values()),
                "hessian_bytes": h.state_bytes() if h else 0,
                "x0_cache_bytes": nbytes((self.data.pools or {}).values()),
                "mask_bytes": self.localization.state_bytes()}

    def report(self) -> dict:
        """Summary of the run so far (the CLI adds the evaluation figures)."""
        mean_rows = self.record.mean_selected_rows()
        return {"concept": str(self.concept) if self.concept is not None else None,
                "kind": self.concept.kind if self.concept is not None else None,
                "method": self.config.method, "steps": self.step_count,
                "applied_steps": self.step_count - self.skipped_steps, "skipped_steps": self.skipped_steps,
                "skipped_by_reason": dict(self.record.skipped_by_reason), "changed_rows": self.changed_rows(),
                "unchanged": self.unchanged(),
                "failed_checkpoints": self.record.failed_checkpoints,
                "seconds": self.seconds,
                "x0_sampling_seconds": self.data.seconds, "adversary_seconds": self.adversary.seconds,
                "trainable_params": self.trainable_params,
                "target_modules": len(self.targets), "target_patterns": list(self.target_patterns),
                "target_rows": self.total_rows,
                "mean_selected_rows": mean_rows, "mean_selected_fraction": mean_rows / max(1, self.total_rows),
                "finalized": self.finalized,
                "mask_fraction": None, **self.localization.report(),
                **self.state_bytes(),
                "device": str(self.device), "threads": torch.get_num_threads(),
                # FSDP2: ranks the targets are sharded over (the *_bytes above are this rank's share)
                "fsdp_shards": self.sharding.world if self.sharding is not None else None,
                "config": asdict(self.config),
                "history": self.history.steps, "evals": self.history.evals}

    @torch.no_grad()
    def changed_rows(self) -> int | None:
        """Rows of the target modules (a weight row with its bias entry) that differ from the
        original model now; None without a frozen copy to compare with (SalUn) or when sharded."""
        if self.theta0 is None or self.sharding is not None:
            return None
        flags = []
        for t in self.targets:
            changed = [(p != p0).reshape(p.shape[0], -1).any(dim=1) for p, p0 in zip(self.params, self.theta0)
                       if any(p is q for q in t.params)]
            flags.append(torch.stack(changed).any(dim=0).sum())
        return int(torch.stack(flags).sum()) if flags else 0

    def base_digest(self) -> str | None:
        """SHA-256 of the target weights the run started from (its frozen copy, or the digest taken
        at the start when it keeps none); None under FSDP2. A checkpoint resumes only on this base."""
        return distributed.weights_digest(self.theta0) if self.theta0 is not None else self._start_digest

    def diverged(self) -> str | None:
        """Why the run's weights must not be saved, or None (see RunRecord.diverged)."""
        return self.record.diverged(self.config.lr)

    def unchanged(self) -> str | None:
        """Why the model would be saved as it was loaded, or None when the run changed a weight."""
        if self.step_count == 0:
            return "no step was run"
        changed = self.changed_rows()
        if changed is None and self._start_digest is not None:
            changed = int(distributed.weights_digest(self.params) != self._start_digest)
        if changed != 0:
            return None
        return self.record.why_unchanged(self.finalized, self.config.xi)

    def source_path(self) -> str | None:
        """The directory the pipeline was loaded from, if any (an input no output may touch)."""
        src = getattr(self.pipe, "name_or_path", None) or self.pipe.config.get("_name_or_path")
        return src if src and os.path.isdir(src) else None

    @torch.no_grad()
    def full_params(self) -> list[Tensor]:
        """The target parameters, whole and detached (FSDP2: gathered from every rank; every rank
        must call it)."""
        if self.sharding is None:
            return [p.detach() for p in self.params]
        return [p.full_tensor().detach() for p in self._dparams]

    def unshard(self) -> None:
        """FSDP2: end the run by finalizing and gathering the edited denoiser into a plain module
        that replaces the sharded one in rank 0's pipeline (evaluate it, save it there; the other
        ranks keep theirs). Every rank must call it; training cannot go on after it. A no-op
        without sharding or when done already."""
        if self.sharding is None or self.unsharded:
            return
        from ..fsdp import gather_module

        self.finalize()
        plain = gather_module(self.unet)
        if plain is not None:
            name = next(k for k, v in self.pipe.components.items() if v is self.unet)
            self.pipe.register_modules(**{name: plain})
        self.unsharded = True

    def write_pipeline(self, directory: str | None) -> None:
        """Finalize and ``save_pretrained`` the edited pipeline into `directory`, which the caller
        has claimed (``trust_fast.io.claim_output``); :meth:`save` does both. FSDP2: every rank
        must call it (:meth:`unshard`); rank 0 writes, the others pass None."""
        from ..io import write_pretrained

        problem = self.diverged()
        if problem:
            raise RunDiverged(f"refusing to save: {problem}")
        self.finalize()
        self.unshard()
        if directory is not None:
            write_pretrained(self.pipe, directory)

    def save(self, out_dir: str, overwrite: bool = False) -> None:
        """Write the edited pipeline to `out_dir` (diffusers format), all or nothing. `out_dir` must
        be new or empty, or an earlier trust_fast output with ``overwrite=True``; it may not be,
        contain or lie inside the source model. trust_fast.io.OutputError (a ValueError) otherwise."""
        from ..io import claim_output

        with claim_output(out_dir, "output directory", overwrite=overwrite,
                          inputs=[("source model", self.source_path())]) as out:
            self.write_pipeline(out.path)
        why = self.unchanged()
        if why:
            warnings.warn(f"saved an unchanged model to {out_dir!r}: {why}", stacklevel=2)
