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
    """True for a directory holding only checkpoint files (made before directories had markers)."""
    entries = os.listdir(directory)
    return bool(entries) and all(re.fullmatch(r"checkpoint(-rank\d+)?\.pt", e) for e in entries)


def claim_checkpoint_dir(directory: str, overwrite: bool = False, inputs=()):
    """Claim a checkpoint directory for a run (trust_fast.io.claim_output, in place): new, empty,
    or trust_fast's and then only with `overwrite`. Under torch.distributed this is collective
    (distributed.lead_then_follow): rank 0 claims it, and the other ranks follow (each rank writes
    its own file) only once rank 0 holds the claim, or raise rank 0's error when it refuses, so no
    rank writes into a directory the rules refuse."""
    from .io import claim_output

    def claim(lead: bool):
        return claim_output(directory, "checkpoint directory", staged=False, overwrite=overwrite, inputs=inputs,
                            recognize=is_checkpoint_dir, lock=lead)

    return distributed.lead_then_follow(lambda: claim(True), lambda: claim(False))


def save_checkpoint(unlearner, directory: str) -> str:
    """Write the run's state to ``directory/checkpoint.pt`` atomically; returns the file's path.
    The directory is claimed like every output (it must be new, empty or trust_fast's); inside
    :meth:`TrustUnlearner.run` the run's own claim covers it. Under torch.distributed it is
    collective: every rank calls it (each writes ``checkpoint-rank{k}.pt``)."""
    from .io import atomic_path

    u = unlearner
    base = u.theta0 if u.theta0 is not None else None
    state = {
        "format": FORMAT,
        "concept": str(u.concept) if u.concept is not None else None,
        "config": _config(u),
        "names": list(u._names),
        "base_digest": distributed.weights_digest(base) if base is not None else None,
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
        with atomic_path(path, ".pt") as tmp:
            torch.save(state, tmp)
    return path


def checkpoint_file(directory: str) -> str:
    """This process's checkpoint file: one per rank under torch.distributed (ranks draw different
    batches, so their generators and data-free caches differ)."""
    name = FILE if distributed.world_size() == 1 else f"checkpoint-rank{distributed.rank()}.pt"
    return os.path.join(directory, name)


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
    from .engine import PREDATED_FIELDS, effective_fields

    ours = effective_fields(_config(u))
    theirs = effective_fields({**_config_dict(type(u.config)()), **PREDATED_FIELDS, **state["config"]})
    diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if diff:
        raise ValueError(f"checkpoint {path!r} was made with another config (differs in {diff}); "
                         "resume with the same options")
    if state["names"] != u._names:
        raise ValueError(f"checkpoint {path!r} has other target parameters than this model")
    if u.theta0 is not None and state["base_digest"] != distributed.weights_digest(u.theta0):
        raise ValueError(f"checkpoint {path!r} was made from another base model (target weights differ)")
    _check_tensors(path, state, u)

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
        if "prefix" in adv:  # written before adversary populations: one prefix
            adv = {"prefixes": [adv["prefix"]], "optimizers": [adv["optimizer"]], "emb_forget": [adv["emb_forget"]],
                   "refreshes": None, "seconds": adv["seconds"]}
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


_KEYS = {"format": str, "config": dict, "names": list, "params": list, "optimizer": dict, "step_count": int,
         "skipped_steps": int, "seconds": float, "pool_seconds": float, "history": dict,
         "generator": torch.Tensor, "torch_rng": torch.Tensor}


def _read(path: str) -> dict:
    """torch.load with weights_only, every failure as one line naming the file and what is wrong."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"checkpoint {path!r} holds objects other than tensors and plain values; refusing "
                         "to load it (it would run code)") from None
    except Exception as e:  # torch raises many types for a damaged file; its first line says which
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"checkpoint {path!r} is damaged ({first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a trust_fast checkpoint")
    for key, kind in _KEYS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise ValueError(f"checkpoint {path!r} is damaged ({key!r} is missing or not a {kind.__name__})")
    return state


def _check_tensors(path: str, state: dict, u) -> None:
    """Every tensor the checkpoint restores has the count and shapes of this unlearner's."""
    def expect(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"checkpoint {path!r} does not fit this run ({what})")

    def same_shapes(saved, live, what: str) -> None:
        expect(isinstance(saved, list) and len(saved) == len(live), f"{what}: {len(saved) if isinstance(saved, list) else '?'} "
               f"tensors, expected {len(live)}")
        for k, (a, b) in enumerate(zip(saved, live)):
            expect(isinstance(a, torch.Tensor) and a.shape == b.shape,
                   f"{what} {k}: shape {tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}, "
                   f"expected {tuple(b.shape)}")
            expect(not a.is_floating_point() or bool(torch.isfinite(a).all()), f"{what} {k} is not finite")

    same_shapes(state["params"], u.params, "target parameter")
    if u.master is not None:
        same_shapes(state.get("master"), u.master, "float32 master weight")
    if u.loss_scale is not None:
        ls = state.get("loss_scale")
        expect(isinstance(ls, dict) and isinstance(ls.get("scale"), float) and math.isfinite(ls["scale"])
               and ls["scale"] >= 1 and isinstance(ls.get("good_steps"), int), "float16 loss scale")
    if u.localizer is not None and state.get("localizer_rows") is not None:
        rows = state["localizer_rows"]
        expect(isinstance(rows, list) and len(rows) == len(u.targets), "localizer rows per target")
        for k, (r, t) in enumerate(zip(rows, u.targets)):
            n = t.weight.shape[0]
            expect(isinstance(r, torch.Tensor) and r.dim() == 1 and not r.is_floating_point()
                   and (r.numel() == 0 or (int(r.min()) >= 0 and int(r.max()) < n)),
                   f"localizer rows of target {k} are not indices below {n}")
    hutch = state.get("hutchinson")
    if u.hutchinson is not None and hutch is not None:
        expect(isinstance(hutch, dict) and isinstance(hutch.get("count"), int) and hutch["count"] >= 0,
               "Hutchinson count")
        same_shapes(hutch.get("diags"), u.hutchinson.diags, "Hessian diagonal")
    if state.get("mask") is not None:
        same_shapes(state["mask"], u.params, "SalUn mask")
    stored_prefixes = state.get("adversary")
    if isinstance(stored_prefixes, dict) and isinstance(stored_prefixes.get("prefixes"), list) and u.config.adv_prefix:
        # one soft token spans every text encoder of the family: a prefix (or token offsets) of another
        # model's encoders would be split wrongly at the first refresh
        want = u.adversary_shape()
        what = (f"{want[0]} tokens over this model's text encoders" if u.config.adv_mode == "prefix"
                else f"offsets of {want[0]} forget prompts over this model's text encoders")
        for k, q in enumerate(stored_prefixes["prefixes"]):
            expect(isinstance(q, torch.Tensor) and tuple(q.shape) == want,
                   f"adversarial prefix {k}: shape {tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}"
                   f", expected {want} ({what})")
    pools = state.get("pools")
    expect(pools is None or (isinstance(pools, dict) and all(isinstance(v, torch.Tensor) for v in pools.values())),
           "data-free image cache")


__all__ = ["save_checkpoint", "load_checkpoint", "has_checkpoint", "checkpoint_file", "claim_checkpoint_dir",
           "is_checkpoint_dir", "FILE"]
