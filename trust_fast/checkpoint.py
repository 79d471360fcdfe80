"""Checkpoint and resume of a TrustUnlearner run: a preempted job continues where it stopped and
ends with the same weights as an uninterrupted one.

A checkpoint is one file, ``DIR/checkpoint.pt`` (``checkpoint-rank{k}.pt`` per rank under torch.distributed) (written to a temp file and renamed, so a kill
mid-write leaves the previous checkpoint intact), holding: the target parameters, the optimizer
state (MaskedAdamW: moments, per-slot steps and slot tables), the localizer's current rows, the
Hutchinson diagonal and its count, the cached data-free images (and SalUn's mask), the step
count, history and timings, and the RNG states (the engine's generator, torch's CPU generator).
The model outside the target modules never changes, so it is not stored; resuming starts from the
same base model, which a fingerprint of the frozen target weights checks.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import asdict

import torch

from . import distributed

FILE = "checkpoint.pt"
FORMAT = "trust_fast.checkpoint/1"
# fields that may differ between the run and its resumption (more steps, other progress output)
_FREE_FIELDS = ("steps",)


def _config_dict(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items() if k not in _FREE_FIELDS}


def _config(unlearner) -> dict:
    return _config_dict(unlearner.config)


def is_checkpoint_dir(directory: str) -> bool:
    """True for a directory holding only checkpoint files (made before directories had markers, or
    before markers listed their files)."""
    from .io import MARKER

    entries = [e for e in os.listdir(directory) if e != MARKER]
    return bool(entries) and all(re.fullmatch(r"checkpoint(-rank\d+)?\.pt", e) for e in entries)


def claim_checkpoint_dir(directory: str, overwrite: bool = False, inputs=()):
    """Claim a checkpoint directory for a run (trust_fast.io.claim_output, in place): new, empty,
    or trust_fast's and then only with `overwrite`. Under torch.distributed this is collective
    (distributed.lead_then_follow): rank 0 claims it, and the other ranks follow (each rank writes
    its own file) only once rank 0 holds the claim, or raise rank 0's error when it refuses, so no
    rank writes into a directory the rules refuse."""
    from .io import claim_output, register_files

    @contextlib.contextmanager
    def claim(lead: bool):
        with claim_output(directory, "checkpoint directory", staged=False, overwrite=overwrite, inputs=inputs,
                          recognize=is_checkpoint_dir, lock=lead) as out:
            if lead:  # every rank's file, listed before any rank writes one (ranks may not race on the marker)
                register_files(directory, [_file_name(k) for k in range(distributed.world_size())])
            yield out

    return distributed.lead_then_follow(lambda: claim(True), lambda: claim(False))


def save_checkpoint(unlearner, directory: str) -> str:
    """Write the run's state to ``directory/checkpoint.pt`` atomically; returns the file's path.
    The directory is claimed like every output (it must be new, empty or trust_fast's); inside
    :meth:`TrustUnlearner.run` the run's own claim covers it. Under torch.distributed it is
    collective: every rank calls it (each writes ``checkpoint-rank{k}.pt``)."""
    from .io import in_place_file

    u = unlearner
    state = {"format": FORMAT, "concept": str(u.concept) if u.concept is not None else None, "config": _config(u),
             "names": list(u._names), "base_digest": u.base_digest(), **u.state_dict()}
    with claim_checkpoint_dir(directory, overwrite=True):
        path = checkpoint_file(directory)
        with in_place_file(directory, os.path.basename(path)) as tmp:
            torch.save(state, tmp)
    return path


def checkpoint_file(directory: str) -> str:
    """This process's checkpoint file: one per rank under torch.distributed (ranks draw different
    batches, so their generators and data-free caches differ)."""
    return os.path.join(directory, _file_name(distributed.rank()))


def _file_name(rank: int) -> str:
    return FILE if distributed.world_size() == 1 else f"checkpoint-rank{rank}.pt"


def has_checkpoint(directory: str) -> bool:
    return os.path.isfile(checkpoint_file(directory))


@torch.no_grad()
def load_checkpoint(unlearner, directory: str) -> int:
    """Restore a run saved by :func:`save_checkpoint` into a freshly built unlearner (same model,
    concept and config, `steps` aside). Returns the step count it resumes at. ValueError when the
    checkpoint is missing, damaged, or belongs to another model, concept or config."""
    u = unlearner
    path = checkpoint_file(directory)
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint to resume from in {directory!r} (expected {os.path.basename(path)})")
    state = _read(path)
    concept = str(u.concept) if u.concept is not None else None
    if state["concept"] != concept:
        raise ValueError(f"checkpoint {path!r} unlearns {state['concept']!r}, not {concept!r}")
    # a field added after the checkpoint was written reads as what the code did before it
    from .config import PREDATED_FIELDS, effective_fields

    ours = effective_fields(_config(u))
    theirs = effective_fields({**_config_dict(type(u.config)()), **PREDATED_FIELDS, **state["config"]})
    diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if diff:
        raise ValueError(f"checkpoint {path!r} was made with another config (differs in {diff}); "
                         "resume with the same options")
    if state["names"] != u._names:
        raise ValueError(f"checkpoint {path!r} has other target parameters than this model")
    if u.base_digest() is not None and state.get("base_digest") != u.base_digest():
        raise ValueError(f"checkpoint {path!r} was made from another base model (target weights differ)")
    _check_fit(path, state, u)
    u.load_state_dict(state)  # everything was checked above, so a refused checkpoint leaves the unlearner as it was
    u.resumed_from = os.path.realpath(directory)
    return u.step_count


class Fields:
    """The checks of one checkpoint file. Every failure is one ValueError naming the file and the
    field: ``is damaged`` for a field that no run could have written (a wrong type, a non-finite
    value, a negative count), ``does not fit this run`` for one of another model or config."""

    def __init__(self, path: str):
        self.path = path

    def damaged(self, field: str, problem: str):
        raise ValueError(f"checkpoint {self.path!r} is damaged ({field} {problem})")

    def misfit(self, field: str, problem: str):
        raise ValueError(f"checkpoint {self.path!r} does not fit this run ({field}{problem})")

    def of_type(self, value, field: str, kind, none: bool = False):
        if value is None and none:
            return value
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.damaged(repr(field), f"is {'missing' if value is None else type(value).__name__}, expected "
                         f"{names}{' or None' if none else ''}")
        return value

    def count(self, value, field: str, low: int = 0, high: int | None = None) -> int:
        self.of_type(value, field, int)
        if value < low or (high is not None and value > high):
            self.damaged(repr(field), f"is {value}, expected {low} <= {field} <= {high if high is not None else 'any'}")
        return value

    def seconds(self, value, field: str) -> float:
        self.of_type(value, field, (int, float))
        if not (math.isfinite(value) and value >= 0):
            self.damaged(repr(field), f"is {value}, expected a finite number >= 0")
        return value

    def tensor(self, value, field: str, like=None, shape=None, floating: bool | None = None, dtype=None,
               low: float | None = None) -> torch.Tensor:
        """A tensor (shape of `like` or `shape`; floating or integer; dtype), finite, >= `low`."""
        self.of_type(value, field, torch.Tensor)
        want = tuple(like.shape) if like is not None else shape
        if want is not None and tuple(value.shape) != tuple(want):
            self.misfit(field, f": shape {tuple(value.shape)}, expected {tuple(want)}")
        if dtype is not None and value.dtype != dtype:
            self.damaged(field, f"is {value.dtype}, expected {dtype}")
        if floating is not None and value.is_floating_point() != floating:
            self.damaged(field, f"is {value.dtype}, expected {'a floating' if floating else 'an integer'} dtype")
        if value.is_complex() or value.dtype not in _READABLE:
            self.damaged(field, f"is {value.dtype}, which trust_fast never stores")
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value.float()).all()):
            self.damaged(field, "is not finite")
        if low is not None and value.numel() and float(value.min()) < low:
            self.damaged(field, f"holds {float(value.min())}, below {low}")
        return value

    def tensors(self, values, field: str, like: list, **kw) -> list[torch.Tensor]:
        self.of_type(values, field, list)
        if len(values) != len(like):
            self.misfit(field, f": {len(values)} tensors, expected {len(like)}")
        return [self.tensor(v, f"{field} {k}", like=w, **kw) for k, (v, w) in enumerate(zip(values, like))]

    def rows(self, value, field: str, n: int) -> torch.Tensor:
        self.tensor(value, field, floating=False)
        if value.dim() != 1 or (value.numel() and not 0 <= int(value.min()) <= int(value.max()) < n):
            self.misfit(field, f" are not indices below {n}")
        if torch.unique(value).numel() != value.numel():
            self.damaged(field, "hold a row more than once")
        return value

    def adam(self, sd, field: str, params: list[torch.Tensor]) -> None:
        """A torch.optim.Adam/AdamW state dict for `params`: moments of their shapes, finite, the
        second moment >= 0, a step count >= 0 (torch's own load_state_dict checks none of these)."""
        self.of_type(sd, field, dict)
        groups, state = sd.get("param_groups"), sd.get("state")
        self.of_type(groups, f"{field}.param_groups", list)
        self.of_type(state, f"{field}.state", dict)
        listed = [i for g in groups if isinstance(g, dict) for i in (g.get("params") or [])]
        if len(listed) != len(params) or sorted(set(listed)) != sorted(listed):
            self.misfit(f"{field} param groups", f": {len(listed)} params, expected {len(params)}")
        where = dict(zip(listed, params))
        for key, st in state.items():
            if key not in where or not isinstance(st, dict):
                self.damaged(f"{field}.state", f"has an entry {key!r} for no parameter")
            for name in ("exp_avg", "exp_avg_sq"):
                self.tensor(st.get(name), f"{field}.state[{key}].{name}", like=where[key], floating=True,
                            low=0.0 if name == "exp_avg_sq" else None)
            step = st.get("step")
            value = float(step) if isinstance(step, torch.Tensor) and step.numel() == 1 else step
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (math.isfinite(value) and value >= 0):
                self.damaged(f"{field}.state[{key}].step", f"is {value!r}, expected a count >= 0")


    def same_groups(self, sd: dict, live, field: str) -> None:
        """The saved param groups' hyperparameters (lr, betas, eps, weight_decay, amsgrad, fused...) are
        the live optimizer's: load_state_dict would otherwise run on with a checkpoint's weight_decay of 1e30."""
        groups = sd.get("param_groups")
        live_groups = getattr(live, "param_groups", None) or []
        if not isinstance(groups, list) or len(groups) != len(live_groups):
            self.misfit(f"{field} param groups", f": {len(groups) if isinstance(groups, list) else '?'}, "
                        f"expected {len(live_groups)}")
        for k, (saved, ours) in enumerate(zip(groups, live_groups)):
            if not isinstance(saved, dict):
                self.damaged(f"{field}.param_groups[{k}]", "is not a dict")
            for key in sorted(set(saved) & set(ours) - {"params"}):
                a, b = saved[key], ours[key]
                if not _plain(a) or (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
                    self.misfit(f"{field} param group {k}", f": {key} {a!r}, this run {b!r}")

    def slot_steps(self, sd: dict, applied: int) -> None:
        """MaskedAdamW counts the steps of each row: none can exceed the steps the run applied."""
        for key, st in (sd.get("state") or {}).items():
            step = st.get("step") if isinstance(st, dict) else None
            if isinstance(step, torch.Tensor) and step.is_floating_point() and step.numel():
                if not bool(torch.isfinite(step).all()) or float(step.max()) > applied or float(step.min()) < 0:
                    self.damaged(f"optimizer.state[{key}].step", f"holds counts outside [0, {applied}], the steps "
                                 "the run applied")

    def dense_steps(self, sd: dict, applied: int) -> None:
        """A dense AdamW steps every param once per applied step."""
        for key, st in sd["state"].items():
            step = float(st["step"])
            if step != applied:
                self.damaged(f"optimizer.state[{key}].step", f"is {step:g}, but the run applied {applied} steps")


# dtypes a checkpoint may hold (never float8, complex or unsigned wider than a byte)
_READABLE = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
             torch.bool)
_HISTORY_STEP = {"step": int, "selected_rows": (int, float), "skipped": bool}


def _plain(value, depth: int = 0) -> bool:
    """A config value as TrustConfig holds them: None, bool, number, str, or a short list of those."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and depth < 2 and len(value) < 1000 and all(_plain(v, depth + 1) for v in value)


def _read(path: str) -> dict:
    """torch.load with weights_only, then every field that does not depend on the run checked for
    type and range; every failure one line naming the file and the field."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"checkpoint {path!r} holds objects other than tensors and plain values; refusing "
                         "to load it (it would run code)") from None
    except Exception as e:  # torch raises many types for a damaged file; its first line says which
        raise ValueError(f"checkpoint {path!r} is damaged ({_first_line(e)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a trust_fast checkpoint")
    f = Fields(path)
    legacy = state.get("adversary")
    if isinstance(legacy, dict) and "prefix" in legacy:  # written before adversary populations: one prefix
        state["adversary"] = {"prefixes": [legacy.get("prefix")], "optimizers": [legacy.get("optimizer")],
                              "emb_forget": [legacy.get("emb_forget")], "refreshes": None,
                              "seconds": legacy.get("seconds")}
    for key, kind in (("config", dict), ("names", list), ("params", list), ("optimizer", dict),
                      ("history", dict), ("generator", torch.Tensor), ("torch_rng", torch.Tensor)):
        f.of_type(state.get(key), key, kind)
    if "concept" not in state:
        f.damaged("'concept'", "is missing")
    f.of_type(state["concept"], "concept", str, none=True)
    f.of_type(state.get("base_digest"), "base_digest", str, none=True)
    for key, value in state["config"].items():
        if not isinstance(key, str) or not _plain(value):
            f.damaged(f"'config.{key}'", f"is a {type(value).__name__}, not a plain value")
    if not all(isinstance(n, str) for n in state["names"]):
        f.damaged("'names'", "holds a name that is not a string")
    steps = f.count(state.get("step_count"), "step_count")
    f.count(state.get("skipped_steps"), "skipped_steps", 0, steps)
    f.seconds(state.get("seconds"), "seconds")
    f.seconds(state.get("pool_seconds"), "pool_seconds")
    history = state["history"]
    f.of_type(history.get("steps"), "history.steps", list)
    f.of_type(history.get("evals"), "history.evals", list)
    last = -1
    for k, entry in enumerate(history["steps"]):
        f.of_type(entry, f"history.steps[{k}]", dict)
        for key, kind in _HISTORY_STEP.items():
            f.of_type(entry.get(key), f"history.steps[{k}].{key}", kind)
        if not last < entry["step"] < steps:
            f.damaged(f"'history.steps[{k}].step'", f"is {entry['step']}, expected a step after {last} and "
                      f"before step_count {steps}")
        last = entry["step"]
    # run() records every step it takes: the count must be where its history ends
    if history["steps"] and last != steps - 1:
        f.damaged("'step_count'", f"is {steps}, but the history's last step is {last}")
    for k, entry in enumerate(history["evals"]):
        f.of_type(entry, f"history.evals[{k}]", dict)
        f.count(entry.get("step"), f"history.evals[{k}].step", 0, steps)
    return state


def _check_fit(path: str, state: dict, u) -> None:
    """Every tensor the checkpoint restores, checked against this unlearner by the component that
    holds it (TrustUnlearner.check_state), and the RNG states, before anything is restored."""
    f = Fields(path)
    u.check_state(f, state)
    f.tensor(state["generator"], "generator", like=u.generator.get_state(), dtype=torch.uint8)
    f.tensor(state["torch_rng"], "torch_rng", like=torch.get_rng_state(), dtype=torch.uint8)
    for key, device in (("generator", u.generator.device), ("torch_rng", torch.device("cpu"))):
        try:  # a state of the right size can still be one no generator accepts
            torch.Generator(device=device).set_state(state[key])
        except RuntimeError as e:
            f.damaged(repr(key), f"is not a generator state ({_first_line(e)})")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


__all__ = ["save_checkpoint", "load_checkpoint", "has_checkpoint", "checkpoint_file", "claim_checkpoint_dir",
           "is_checkpoint_dir", "FILE"]
