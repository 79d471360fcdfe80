"""The slot tables of MaskedAdamW's per-param state.

The state of a param ``p`` with R rows of C elements: ``slot_of_row`` (int32,
(R,)) is the state slot of each row (-1 until the row is first selected),
``row_of_slot`` (int64, (capacity,)) the row of each used slot,
``exp_avg``/``exp_avg_sq`` (float32, (capacity, C)) and ``step`` (float32,
(capacity,)) one entry per slot, ``num_slots`` (int) the slots in use.  The
capacity grows by :data:`GROWTH` when new rows need slots.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from ..ops.schema import row_width, rows_of

GROWTH = 1.25

#: the per-param state (see init_state)
STATE_KEYS = ("slot_of_row", "row_of_slot", "exp_avg", "exp_avg_sq", "step", "num_slots")


def assign_slots(state: defaultdict[Tensor, dict], ps: list[Tensor], rows: list[Tensor]) -> list[Tensor]:
    """Slots (int32, (n,)) of the rows ``rows[i]`` (int64, (n,)) in ``ps[i]``'s state (one device),
    giving rows selected for the first time fresh zero slots in the order given.

    Finding the new rows of all params together costs one host sync (on a GPU), not one per
    param: the engine sets new rows every step. `state` is the optimizer's, {param: state dict}:
    a param met for the first time gets empty slot tables."""
    for p in ps:
        if not state[p]:
            init_state(state[p], p)
    slots = [state[p]["slot_of_row"][r] for p, r in zip(ps, rows)]
    counts = [r.numel() for r in rows]
    total = sum(counts)
    if total == 0:
        return slots
    device = rows[0].device
    unseen = torch.cat(slots) < 0
    seg = torch.repeat_interleave(torch.arange(len(ps), device=device), torch.tensor(counts, device=device),
                                  output_size=total)
    n_new = torch.zeros(len(ps), dtype=torch.int64, device=device).index_add_(0, seg, unseen.long()).tolist()
    if not any(n_new):
        return slots
    # positions of the unseen rows, in order (a stable sort puts them first; their count is known)
    pos = torch.sort((~unseen).to(torch.uint8), stable=True).indices[: sum(n_new)]
    fresh = torch.cat(rows)[pos].split(n_new)
    for i, (p, f) in enumerate(zip(ps, fresh)):
        if f.numel():
            add_slots(state[p], p, f)
            slots[i] = state[p]["slot_of_row"][rows[i]]
    return slots


def init_state(st: dict, p: Tensor) -> None:
    """Empty slot tables for ``p`` in its state ``st``: no row has a slot, the capacity is 0."""
    st["slot_of_row"] = torch.full((rows_of(p),), -1, dtype=torch.int32, device=p.device)
    st["row_of_slot"] = torch.zeros(0, dtype=torch.int64, device=p.device)
    st["exp_avg"] = torch.zeros(0, row_width(p), dtype=torch.float32, device=p.device)
    st["exp_avg_sq"] = torch.zeros_like(st["exp_avg"])
    st["step"] = torch.zeros(0, dtype=torch.float32, device=p.device)
    st["num_slots"] = 0


def add_slots(st: dict, p: Tensor, fresh: Tensor) -> None:
    """Fresh zero slots in ``p``'s state ``st`` for the rows ``fresh`` of ``p`` (none of them has a slot yet)."""
    n_new = fresh.numel()
    used = st["num_slots"]
    need = used + n_new
    cap = st["step"].numel()
    if need > cap:
        new_cap = max(need, int(cap * GROWTH))
        for key in ("exp_avg", "exp_avg_sq", "step", "row_of_slot"):
            old = st[key]
            grown = old.new_zeros((new_cap, *old.shape[1:]))
            grown[:used] = old[:used]
            st[key] = grown
    st["slot_of_row"][fresh] = torch.arange(used, need, dtype=torch.int32, device=p.device)
    st["row_of_slot"][used:need] = fresh
    st["num_slots"] = need
