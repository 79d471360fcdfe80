"""The checks of what MaskedAdamW is given: rows, hyperparameters, a saved state dict.

A saved state (a checkpoint's) is checked whole before anything of it is
restored, and every problem is one line naming the param and the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ..ops.schema import row_width, rows_of
from .slot_tables import STATE_KEYS


def check_rows_of(name: str, p: Tensor, r) -> None:
    """The checks :meth:`MaskedAdamW.set_rows` runs on the rows ``r`` of param ``p`` (``name`` in errors)
    before the index checks: a tensor of an integer dtype, for a contiguous param."""
    if not isinstance(r, Tensor):
        raise TypeError(f"rows: the rows of {name} must be a tensor of row indices, got {type(r).__name__}")
    if r.dtype == torch.bool or r.is_floating_point() or r.is_complex():
        # casting would truncate floats and read a bool mask as the indices 0 and 1
        raise TypeError(f"rows: the rows of {name} are {r.dtype}; pass an integer tensor of row indices "
                        "(for a bool mask: mask.nonzero().flatten())")
    if not p.is_contiguous():
        # the kernels update rows in place through flat offsets; refused here, the error names
        # the caller's param (the op would name its position in an internal list)
        raise ValueError(f"rows: {name} is not contiguous; MaskedAdamW updates rows in place and needs "
                         "contiguous params (e.g. p.data = p.data.contiguous())")


def hyperparameter_problem(group: Mapping) -> str | None:
    """What is wrong with a param group's lr, betas, eps and weight_decay (None: nothing)."""
    try:
        values = {k: _number(group[k]) for k in ("lr", "eps", "weight_decay")}
        beta1, beta2 = (_number(b) for b in group["betas"])
    except (KeyError, TypeError, ValueError) as e:
        return f"lr, betas (a pair), eps and weight_decay must be numbers ({type(e).__name__}: {e})"
    for k, v in values.items():
        if not math.isfinite(v) or v < 0:
            return f"{k} must be finite and >= 0, got {v}"
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        return f"betas must be in [0, 1), got {(beta1, beta2)}"
    return None


def _number(value) -> float:
    """A real number as float: bools, strings and tensors of several values are not numbers here."""
    if isinstance(value, (bool, str, bytes)) or (isinstance(value, Tensor) and value.numel() != 1):
        raise TypeError(f"{value!r} is not a number")
    return float(value)


def slot_state_problem(p: Tensor, st: Mapping) -> str | None:
    """What is wrong with a saved per-param state for ``p`` (None: nothing).

    The state must hold the tensors of :func:`.slot_tables.init_state` with their
    dtypes and shapes (the capacity is the length of ``step``), ``num_slots``
    within the capacity, and slot tables that are in range and inverse to each
    other on the used slots.
    """
    missing = [k for k in STATE_KEYS if k not in st]
    if missing:
        return f"{', '.join(repr(k) for k in missing)} missing"
    step = st["step"]
    if not (isinstance(step, Tensor) and step.dtype == torch.float32 and step.dim() == 1):
        got = f"{step.dtype} {tuple(step.shape)}" if isinstance(step, Tensor) else type(step).__name__
        return f"'step' is {got}, expected a 1-D torch.float32 tensor (a step count per slot)"
    cap = step.shape[0]
    expected = {"slot_of_row": (torch.int32, (rows_of(p),)), "row_of_slot": (torch.int64, (cap,)),
                "exp_avg": (torch.float32, (cap, row_width(p))), "exp_avg_sq": (torch.float32, (cap, row_width(p)))}
    for key, (dtype, want) in expected.items():
        v = st[key]
        if not (isinstance(v, Tensor) and v.dtype == dtype and tuple(v.shape) == want):
            got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
            return f"{key!r} is {got}, expected {dtype} {want}"
    for key in ("exp_avg", "exp_avg_sq", "step"):
        if not bool(torch.isfinite(st[key]).all()):
            return f"{key!r} is not finite"
    if st["exp_avg_sq"].numel() and float(st["exp_avg_sq"].min()) < 0:
        return "'exp_avg_sq' holds a negative second moment"
    if step.numel() and (float(step.min()) < 0 or not torch.equal(step, step.round())):
        return "'step' holds a count that is negative or not a whole number"
    n = st["num_slots"]
    if not isinstance(n, int) or isinstance(n, bool):
        return f"'num_slots' must be an int, got {type(n).__name__}"
    if not 0 <= n <= cap:
        return f"'num_slots' is {n} but the state holds {cap} slots"
    slot_of_row, used_rows = st["slot_of_row"], st["row_of_slot"][:n]
    if slot_of_row.numel() and not -1 <= int(slot_of_row.min()) <= int(slot_of_row.max()) < n:
        out = int(slot_of_row.min()) if int(slot_of_row.min()) < -1 else int(slot_of_row.max())
        return f"'slot_of_row' holds slot {out}, outside [-1, {n}) (-1: no slot)"
    if n and not 0 <= int(used_rows.min()) <= int(used_rows.max()) < rows_of(p):
        out = int(used_rows.min()) if int(used_rows.min()) < 0 else int(used_rows.max())
        return f"'row_of_slot' holds row {out}, out of range [0, {rows_of(p)})"
    if (int((slot_of_row >= 0).sum()) != n
            or not torch.equal(slot_of_row[used_rows].long(), torch.arange(n, device=slot_of_row.device))):
        return "'slot_of_row' and 'row_of_slot' disagree (they must map the used rows and slots one to one)"
    return None


def check_state_dict(sd, param_groups: list[dict], position: Mapping[int, int]) -> dict:
    """{saved param index: param} for a state dict that fits an optimizer with `param_groups`; else a
    one-line ValueError. `position`: the position of each param in the optimizer, by ``id``.

    Checks everything :meth:`MaskedAdamW.load_state_dict` restores before it changes
    anything: the param groups (count, params per group, hyperparameters),
    every param's state (keys, dtypes and shapes against the param, slot
    tables in range and inverse to each other) and the saved rows.
    """
    def bad(msg: str) -> None:
        raise ValueError(f"optimizer state_dict: {msg}")

    if not (isinstance(sd, Mapping) and isinstance(sd.get("state"), Mapping)
            and isinstance(sd.get("param_groups"), (list, tuple))):
        bad("expected a dict with 'state' (a dict) and 'param_groups' (a list)")
    saved_groups = sd["param_groups"]
    if len(saved_groups) != len(param_groups):
        bad(f"it has {len(saved_groups)} param groups but the optimizer has {len(param_groups)}")
    id_map: dict = {}
    for gi, (sg, g) in enumerate(zip(saved_groups, param_groups)):
        if not (isinstance(sg, Mapping) and isinstance(sg.get("params"), (list, tuple))
                and all(isinstance(i, int) for i in sg["params"])):
            bad(f"param group {gi} is not a dict with a 'params' list of param indices")
        if len(sg["params"]) != len(g["params"]):
            bad(f"param group {gi} has {len(g['params'])} params but the state_dict's has {len(sg['params'])}")
        problem = hyperparameter_problem(sg)
        if problem:
            bad(f"param group {gi}: {problem}")
        id_map.update(zip(sg["params"], g["params"]))
    if len(id_map) != sum(len(g["params"]) for g in param_groups):
        bad("its param groups list a param index more than once")

    def name(k) -> str:
        p = id_map[k]
        return f"parameter #{position[id(p)]} of shape {tuple(p.shape)}"

    for k, st in sd["state"].items():
        if k not in id_map:
            bad(f"'state' has an entry for param index {k!r}, which no param group lists")
        if not isinstance(st, Mapping):
            bad(f"the state of {name(k)} is a {type(st).__name__}, not a dict")
        problem = slot_state_problem(id_map[k], st)
        if problem:
            bad(f"the state of {name(k)}: {problem}")
    rows = sd.get("rows")
    if rows is not None:
        if not isinstance(rows, Mapping):
            bad(f"'rows' is a {type(rows).__name__}, not a dict")
        for k, r in rows.items():
            if k not in id_map:
                bad(f"'rows' has an entry for param index {k!r}, which no param group lists")
            p = id_map[k]
            try:
                check_rows_of(name(k), p, r)
            except (TypeError, ValueError) as e:
                bad(str(e))
            if r.dim() != 1:
                bad(f"the rows of {name(k)} have shape {tuple(r.shape)}, not (n,)")
            if r.numel() and not 0 <= int(r.min()) <= int(r.max()) < rows_of(p):
                out = int(r.min()) if int(r.min()) < 0 else int(r.max())
                bad(f"the rows of {name(k)} hold row {out}, out of range [0, {rows_of(p)})")
            if torch.unique(r).numel() != r.numel():
                bad(f"the rows of {name(k)} hold a row more than once")
    return id_map
