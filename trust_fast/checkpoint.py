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
    state = {
        "format": FORMAT,
        "concept": str(u.concept) if u.concept is not None else None,
        "config": _config(u),
        "names": list(u._names),
        "base_digest": u.base_digest(),
        "params": [p.detach().cpu().clone() for p in u.params],
        "master": None if u.master is None else [q.detach().cpu().clone() for q in u.master],
        "loss_scale": None if u.loss_scale is None else {"scale": u.loss_scale, "good_steps": u._good_steps},
        "optimizer": u.optimizer.state_dict(),
        "localizer_rows": (None if u.localizer is None or u.localizer.rows is None
                           else [r.cpu() for r in u.localizer.rows]),
        "hutchinson": (None if u.hutchinson is None
                       else {"diags": [d.cpu() for d in u.hutchinson.diags], "count": u.hutchinson.count}),
        "pools": None if u.pools is None else {k: v.cpu() for k, v in u.pools.items()},
        "mask": None if u.mask is None else [m.cpu() for m in u.mask],
        "adversary": (None if not u.adv_prefixes else
                      {"prefixes": [q.detach().cpu() for q in u.adv_prefixes],
                       "optimizers": [o.state_dict() for o in u.adv_optimizers],
                       "emb_forget": [e.cpu() for e in u.emb_forget_adv],
                       "emb_retain": [e.cpu() for e in u.emb_retain_adv], "refreshes": u.adv_refreshes,
                       "seconds": u.adv_seconds}),
        "step_count": u.step_count,
        "skipped_steps": u.skipped_steps,
        "seconds": u.seconds,
        "pool_seconds": u.pool_seconds,
        "history": {"steps": u.history.steps, "evals": u.history.evals},
        "generator": u.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
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

    # the optimizer validates its state before it changes anything; everything else was checked above,
    # so a refused checkpoint leaves the unlearner as it was
    u.optimizer.load_state_dict(state["optimizer"])
    for p, v in zip(u.params, state["params"], strict=True):
        p.copy_(v.to(p.device, p.dtype))
    if u.master is not None:
        for q, v in zip(u.master, state["master"], strict=True):
            q.copy_(v.to(q.device, q.dtype))
    if u.loss_scale is not None:
        u.loss_scale, u._good_steps = float(state["loss_scale"]["scale"]), int(state["loss_scale"]["good_steps"])
    if u.localizer is not None and state["localizer_rows"] is not None:
        u.localizer.rows = [r.to(u.device) for r in state["localizer_rows"]]
    if u.hutchinson is not None and state["hutchinson"] is not None:
        for d, v in zip(u.hutchinson.diags, state["hutchinson"]["diags"], strict=True):
            d.copy_(v.to(d.device))
        u.hutchinson.count = state["hutchinson"]["count"]
        if u.hutchinson.count > 0:
            u._set_diag_penalty()
    if state["pools"] is not None:
        u.pools = {k: v.to(u.device, u.dtype) for k, v in state["pools"].items()}
    if state["mask"] is not None:
        u.mask = [m.to(u.device) for m in state["mask"]]
    adv = state.get("adversary")
    if adv is not None:
        u.adv_prefixes = [q.to(u.device) for q in adv["prefixes"]]
        u.adv_optimizers = []
        for q, o in zip(u.adv_prefixes, adv["optimizers"]):
            u.adv_optimizers.append(torch.optim.Adam([q], lr=u.config.adv_lr))
            u.adv_optimizers[-1].load_state_dict(o)
        u.emb_forget_adv = [e.to(u.device, u.dtype) for e in adv["emb_forget"]]
        u.emb_retain_adv = [e.to(u.device, u.dtype) for e in adv.get("emb_retain", [])]
        u.adv_refreshes = adv["refreshes"] if adv["refreshes"] is not None else len(u.adv_prefixes)
        u.adv_seconds = adv["seconds"]
    u.step_count = state["step_count"]
    u.skipped_steps = state["skipped_steps"]
    u.seconds, u.pool_seconds = state["seconds"], state["pool_seconds"]
    u.history.steps, u.history.evals = state["history"]["steps"], state["history"]["evals"]
    u.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    u.resumed_from = os.path.realpath(directory)
    return u.step_count


class _Fields:
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
    f = _Fields(path)
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
    """Every tensor the checkpoint restores, checked against this unlearner: count, shape, dtype
    kind, range, finiteness, before anything is restored."""
    f = _Fields(path)
    f.tensors(state["params"], "target parameter", u.params, floating=True)
    if u.master is not None:
        f.tensors(state.get("master"), "float32 master weight", u.master, floating=True)
    if u.loss_scale is not None:
        ls = f.of_type(state.get("loss_scale"), "loss_scale", dict)
        if not (isinstance(ls.get("scale"), float) and math.isfinite(ls["scale"]) and ls["scale"] >= 1):
            f.damaged("'loss_scale.scale'", f"is {ls.get('scale')!r}, expected a float >= 1")
        f.count(ls.get("good_steps"), "loss_scale.good_steps")
    steps, applied = state["step_count"], state["step_count"] - state["skipped_steps"]
    if u.localizer is not None:
        rows = f.of_type(state.get("localizer_rows"), "localizer_rows", list, none=True)
        if rows is not None:
            if len(rows) != len(u.targets):
                f.misfit("localizer rows per target", f": {len(rows)}, expected {len(u.targets)}")
            for k, (r, t) in enumerate(zip(rows, u.targets)):
                f.rows(r, f"localizer rows of target {k}", t.weight.shape[0])
        try:  # MaskedAdamW's own checks, with the file named
            u.masked_optimizer.check_state_dict(state["optimizer"])
        except ValueError as e:
            f.damaged("'optimizer':", str(e))
        _check_slot_steps(f, state["optimizer"], applied)
    else:
        f.adam(state["optimizer"], "optimizer", u.opt_params)
        _check_dense_steps(f, state["optimizer"], applied)
    hutch = state.get("hutchinson")
    if u.hutchinson is not None:
        hutch = f.of_type(hutch, "hutchinson", dict, none=True)
        if hutch is not None:
            f.count(hutch.get("count"), "hutchinson.count", 0, steps * u.config.diag_samples)
            f.tensors(hutch.get("diags"), "Hessian diagonal", u.hutchinson.diags, floating=True)
    pools = f.of_type(state.get("pools"), "pools", dict, none=True)
    if pools is not None:
        want = u.pool_shapes()
        if set(pools) != set(want):
            f.misfit("data-free image cache", f": pools {sorted(map(str, pools))}, expected {sorted(want)}")
        for name, shape in want.items():
            f.tensor(pools[name], f"data-free images {name!r}", shape=shape, floating=True)
    mask = f.of_type(state.get("mask"), "mask", list, none=True)
    if mask is not None:
        f.tensors(mask, "SalUn mask", u.params)
    if steps > 0 and u.config.localization == "static" and mask is None:
        f.damaged("'mask'", "is missing, and a SalUn run has one from its first step")
    adv = f.of_type(state.get("adversary"), "adversary", dict, none=True)
    if adv is not None:
        _check_adversary(f, adv, u)
    f.tensor(state["generator"], "generator", like=u.generator.get_state(), dtype=torch.uint8)
    f.tensor(state["torch_rng"], "torch_rng", like=torch.get_rng_state(), dtype=torch.uint8)
    for key, device in (("generator", u.generator.device), ("torch_rng", torch.device("cpu"))):
        try:  # a state of the right size can still be one no generator accepts
            torch.Generator(device=device).set_state(state[key])
        except RuntimeError as e:
            f.damaged(repr(key), f"is not a generator state ({_first_line(e)})")
    _same_groups(f, state["optimizer"], u.optimizer, "optimizer")
    for k, o in enumerate((adv or {}).get("optimizers") or []):
        if isinstance(o, dict):
            _same_groups(f, o, torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=u.config.adv_lr),
                         f"adversary.optimizers[{k}]")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _same_groups(f: _Fields, sd: dict, live, field: str) -> None:
    """The saved param groups' hyperparameters (lr, betas, eps, weight_decay, amsgrad, fused...) are
    this run's: load_state_dict would otherwise run on with a checkpoint's weight_decay of 1e30."""
    groups = sd.get("param_groups")
    live_groups = getattr(live, "param_groups", None) or []
    if not isinstance(groups, list) or len(groups) != len(live_groups):
        f.misfit(f"{field} param groups", f": {len(groups) if isinstance(groups, list) else '?'}, "
                 f"expected {len(live_groups)}")
    for k, (saved, ours) in enumerate(zip(groups, live_groups)):
        if not isinstance(saved, dict):
            f.damaged(f"{field}.param_groups[{k}]", "is not a dict")
        for key in sorted(set(saved) & set(ours) - {"params"}):
            a, b = saved[key], ours[key]
            if not _plain(a) or (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
                f.misfit(f"{field} param group {k}", f": {key} {a!r}, this run {b!r}")


def _check_slot_steps(f: _Fields, sd: dict, applied: int) -> None:
    """MaskedAdamW counts the steps of each row: none can exceed the steps the run applied."""
    for key, st in (sd.get("state") or {}).items():
        step = st.get("step") if isinstance(st, dict) else None
        if isinstance(step, torch.Tensor) and step.is_floating_point() and step.numel():
            if not bool(torch.isfinite(step).all()) or float(step.max()) > applied or float(step.min()) < 0:
                f.damaged(f"optimizer.state[{key}].step", f"holds counts outside [0, {applied}], the steps the run "
                          "applied")


def _check_dense_steps(f: _Fields, sd: dict, applied: int) -> None:
    """A dense AdamW steps every param once per applied step."""
    for key, st in sd["state"].items():
        step = float(st["step"])
        if step != applied:
            f.damaged(f"optimizer.state[{key}].step", f"is {step:g}, but the run applied {applied} steps")


def _check_adversary(f: _Fields, adv: dict, u) -> None:
    if not u.config.adv_prefix:
        f.misfit("adversary", ": the checkpoint has an adversary, this run none")
    prefixes = f.of_type(adv.get("prefixes"), "adversary.prefixes", list)
    optimizers = f.of_type(adv.get("optimizers"), "adversary.optimizers", list)
    if not 1 <= len(prefixes) <= u.config.adv_population or len(optimizers) != len(prefixes):
        f.misfit("adversary", f": {len(prefixes)} prefixes and {len(optimizers)} optimizers, expected as many, "
                 f"1 to {u.config.adv_population}")
    # one soft token spans every text encoder of the family: a prefix (or token offsets) of another
    # model's encoders would be split wrongly at the first refresh
    want = u.adversary_shape()
    what = (f"{want[0]} tokens over this model's text encoders" if u.config.adv_mode == "prefix"
            else f"offsets of {want[0]} forget prompts over this model's text encoders")
    for k, (q, o) in enumerate(zip(prefixes, optimizers)):
        f.of_type(q, f"adversarial prefix {k}", torch.Tensor)
        if tuple(q.shape) != want:
            f.misfit(f"adversarial prefix {k}", f": shape {tuple(q.shape)}, expected {want} ({what})")
        f.tensor(q, f"adversarial prefix {k}", floating=True)
        f.adam(o, f"adversary.optimizers[{k}]", [q])
    emb_forget = f.of_type(adv.get("emb_forget"), "adversary.emb_forget", list)
    f.tensors(emb_forget, "adversary.emb_forget", [u.emb_forget] * len(prefixes), floating=True)
    emb_retain = f.of_type(adv.get("emb_retain", []), "adversary.emb_retain", list)
    if emb_retain:
        f.tensors(emb_retain, "adversary.emb_retain", [u.emb_retain] * len(prefixes), floating=True)
    refreshes = adv.get("refreshes")
    if refreshes is not None:
        f.count(refreshes, "adversary.refreshes", len(prefixes))
    f.seconds(adv.get("seconds"), "adversary.seconds")


__all__ = ["save_checkpoint", "load_checkpoint", "has_checkpoint", "checkpoint_file", "claim_checkpoint_dir",
           "is_checkpoint_dir", "FILE"]
