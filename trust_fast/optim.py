"""MaskedAdamW: AdamW on selected rows only, with state for selected rows only.

Each parameter keeps a slot table: ``slot_of_row[r]`` is the state slot of row
``r`` (-1 until the row is first selected).  ``exp_avg``/``exp_avg_sq``
(float32, (capacity, C)) and ``step`` (float32, (capacity,)) hold one entry per
slot, so optimizer memory follows the rows ever selected, not the model.
Every slot keeps its own step count, so a row's bias correction counts the
steps in which that row was updated: after any sequence of steps each row
equals what a separate torch.optim.AdamW over that row alone, stepped only
when the row was selected, would give (within float32 rounding).
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from . import ops
from .ops.library import is_plain_tensor, plain_eager_mode
from .ops.reference import DIAG_DTYPES, check_indices, check_masked_adamw_scalars, grads_match_params, rows_of, row_width
from .ops.registry import kernel_for

_GROWTH = 1.25


def _check_rows_of(name: str, p: Tensor, r) -> None:
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


def _hyperparameter_problem(group: Mapping) -> str | None:
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


# the per-param state (see _init_state)
_STATE_KEYS = ("slot_of_row", "row_of_slot", "exp_avg", "exp_avg_sq", "step", "num_slots")


def _slot_state_problem(p: Tensor, st: Mapping) -> str | None:
    """What is wrong with a saved per-param state for ``p`` (None: nothing).

    The state must hold the tensors of :meth:`MaskedAdamW._init_state` with their
    dtypes and shapes (the capacity is the length of ``step``), ``num_slots``
    within the capacity, and slot tables that are in range and inverse to each
    other on the used slots.
    """
    missing = [k for k in _STATE_KEYS if k not in st]
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


class MaskedAdamW(torch.optim.Optimizer):
    """Row-sparse AdamW with compact, slot-indexed state.

    Usage::

        opt = MaskedAdamW(params, lr=1e-5)
        opt.set_rows({w: rows, b: rows})     # rows of the next step; absent params are not updated
        opt.set_penalty({w: (h, w0)}, lam)  # optional: grad += lam * h * (w - w0) on the updated rows
        loss.backward(); opt.step()

    A 1-D bias is given the same row indices as its weight.  Parameters may be
    float32, float16 or bfloat16; state and math are float32.

    The first step after :meth:`set_rows` or :meth:`set_penalty` goes through the
    op ``trust_fast.ops.masked_adamw_``, which checks every tensor.  Later steps
    on the same rows check only the gradients and the hyperparameters and call
    the backend kernel directly (in eager mode, with plain tensors), which cuts
    the host cost of a step by 8-19% (BENCHMARKS.md).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        compile: bool = False,
    ) -> None:
        problem = _hyperparameter_problem(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        if problem:
            raise ValueError(problem)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        # None until set_rows: a step then would silently update nothing, so it refuses to run
        self._rows: dict[Tensor, Tensor] | None = None
        self._slots: dict[Tensor, Tensor] = {}  # slot of each row in _rows (from set_rows)
        self._penalty: dict[Tensor, tuple[Tensor, Tensor]] = {}
        self._lam = 0.0
        # kernel arguments of the current rows and penalty, rebuilt when either changes
        self._args: list[list[tuple[list[Tensor], list[list[Tensor]], dict]]] = []
        # per kernel call: the gradients the op last checked with its tensors (None: not checked yet),
        # and the backend's prepared launches for its tensors (backends that offer them: triton)
        self._checked_grads: list[list[list[Tensor] | None]] = []
        self._plans: list[list[tuple | None]] = []
        self._args_stale = True
        # with compile, the kernel call runs as one torch.compile graph (the op traced by its fake)
        self._update = ops.masked_adamw_
        if compile:
            from .localize import compile_op_layer

            self._update = compile_op_layer(ops.masked_adamw_)

    def __getstate__(self) -> dict:
        # torch's Optimizer keeps only defaults, state and param_groups: copy.deepcopy and pickle
        # would drop the rows and the penalty, and the next step would refuse to run. The kernel
        # arguments and plans hold references to the old tensors: rebuilt on the next step.
        state = self.__dict__.copy()
        state.update(_args=[], _checked_grads=[], _plans=[], _args_stale=True)
        return state

    # ------------------------------------------------------------------ inputs

    def _positions(self) -> dict[int, int]:
        """Position of each param in the optimizer's param list (groups in order), by ``id``."""
        return {id(p): k for k, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def set_rows(self, rows: Mapping[Tensor, Tensor]) -> None:
        """Set the rows the next :meth:`step` updates: {param: integer tensor (n,) of row indices}.

        Rows must be in range and unique; any integer dtype is taken (float and
        bool tensors are refused: for a bool mask pass ``mask.nonzero().flatten()``).
        The params given must be contiguous (rows are updated in place).  A param
        absent from ``rows`` is not updated; ``{}`` or empty index tensors make
        the next step update nothing.  Rows selected for the first time get fresh
        zero state.  Setting the rows already set changes nothing (the next step
        stays a direct one).
        """
        if self._same_rows(rows):
            return
        position = self._positions()
        new: dict[Tensor, Tensor] = {}
        by_device: dict[torch.device, list[Tensor]] = {}
        for i, (p, r) in enumerate(rows.items()):
            if id(p) not in position:
                raise ValueError(f"rows: parameter #{i} of shape {tuple(p.shape)} is not in this optimizer")
            _check_rows_of(f"parameter #{position[id(p)]} of shape {tuple(p.shape)}", p, r)
            # a private copy: changing the caller's tensor later does not change the rows set here
            new[p] = r.to(device=p.device, dtype=torch.int64, copy=True)
            by_device.setdefault(p.device, []).append(p)
        slots: dict[Tensor, Tensor] = {}
        for device, ps in by_device.items():
            check_indices("rows[param]", [new[p] for p in ps], [rows_of(p) for p in ps], device)
            slots.update(zip(ps, self._assign_slots(ps, [new[p] for p in ps])))
        self._rows = new
        self._slots = slots
        self._args_stale = True

    def _same_rows(self, rows: Mapping[Tensor, Tensor]) -> bool:
        """Whether ``rows`` names the params of the current rows, in order, with equal int64 rows."""
        if not self._rows or len(rows) != len(self._rows):
            return False
        by_device: dict[torch.device, tuple[list[Tensor], list[Tensor]]] = {}
        for (p, r), (q, old) in zip(rows.items(), self._rows.items()):
            if (p is not q or not isinstance(r, Tensor) or r.dtype != torch.int64 or r.device != old.device
                    or r.shape != old.shape):
                return False
            news, olds = by_device.setdefault(r.device, ([], []))
            news.append(r)
            olds.append(old)
        # one comparison per device (on a GPU, one wait), not one per param
        return all(torch.equal(torch.cat(news), torch.cat(olds)) for news, olds in by_device.values())

    def set_penalty(self, penalty: Mapping[Tensor, tuple[Tensor, Tensor]], lam: float) -> None:
        """Fuse the Hessian-diagonal penalty ``lam * h * (p - p0)`` into the gradient of updated rows.

        ``penalty`` maps a param to ``(h, p0)``: ``h`` per element (param shape)
        or per row ((rows,)), float32 or bfloat16 (read as it is, no copy; other
        dtypes become float32), ``p0`` the reference weights (param shape).
        ``set_penalty({}, 0.0)`` clears it.
        """
        position = self._positions()
        new = {}
        for i, (p, (h, p0)) in enumerate(penalty.items()):
            if id(p) not in position:
                raise ValueError(f"penalty: parameter #{i} of shape {tuple(p.shape)} is not in this optimizer")
            if h.shape not in (p.shape, (rows_of(p),)):
                raise ValueError(
                    f"penalty: h of parameter #{i} has shape {tuple(h.shape)}; expected {tuple(p.shape)} or ({rows_of(p)},)"
                )
            if p0.shape != p.shape:
                raise ValueError(f"penalty: p0 of parameter #{i} has shape {tuple(p0.shape)}; expected {tuple(p.shape)}")
            new[p] = (
                h.detach().to(device=p.device, dtype=h.dtype if h.dtype in DIAG_DTYPES else torch.float32).contiguous(),
                p0.detach().to(device=p.device, dtype=p.dtype).contiguous(),
            )
        self._penalty = new
        self._lam = float(lam)
        self._args_stale = True

    # ------------------------------------------------------------------- state

    def _assign_slots(self, ps: list[Tensor], rows: list[Tensor]) -> list[Tensor]:
        """Slots of ``rows[i]`` in ``ps[i]``'s state (one device), giving rows selected for the first
        time fresh zero slots in the order given.

        Finding the new rows of all params together costs one host sync (on a GPU), not one per
        param: the engine sets new rows every step."""
        for p in ps:
            if not self.state[p]:
                self._init_state(p)
        slots = [self.state[p]["slot_of_row"][r] for p, r in zip(ps, rows)]
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
                self._add_slots(p, f)
                slots[i] = self.state[p]["slot_of_row"][rows[i]]
        return slots

    def _init_state(self, p: Tensor) -> None:
        st = self.state[p]
        st["slot_of_row"] = torch.full((rows_of(p),), -1, dtype=torch.int32, device=p.device)
        st["row_of_slot"] = torch.zeros(0, dtype=torch.int64, device=p.device)
        st["exp_avg"] = torch.zeros(0, row_width(p), dtype=torch.float32, device=p.device)
        st["exp_avg_sq"] = torch.zeros_like(st["exp_avg"])
        st["step"] = torch.zeros(0, dtype=torch.float32, device=p.device)
        st["num_slots"] = 0

    def _add_slots(self, p: Tensor, fresh: Tensor) -> None:
        """Fresh zero slots for the rows ``fresh`` of ``p`` (none of them has a slot yet)."""
        st = self.state[p]
        n_new = fresh.numel()
        used = st["num_slots"]
        need = used + n_new
        cap = st["step"].numel()
        if need > cap:
            new_cap = max(need, int(cap * _GROWTH))
            for key in ("exp_avg", "exp_avg_sq", "step", "row_of_slot"):
                old = st[key]
                grown = old.new_zeros((new_cap, *old.shape[1:]))
                grown[:used] = old[:used]
                st[key] = grown
        st["slot_of_row"][fresh] = torch.arange(used, need, dtype=torch.int32, device=p.device)
        st["row_of_slot"][used:need] = fresh
        st["num_slots"] = need

    @torch.no_grad()
    def snapshot_rows(self) -> list[tuple]:
        """What the next :meth:`step` will change, for :meth:`undo_step`: the rows set now (with
        :meth:`set_rows`) of every param and their state slots. A copy the size of the selection."""
        snap = []
        for p, rows in (self._rows or {}).items():
            if rows.numel() == 0:
                continue
            st, slots = self.state[p], self._slots[p].long()
            snap.append((p, rows, p.index_select(0, rows), slots,
                         *(st[k].index_select(0, slots) for k in ("exp_avg", "exp_avg_sq", "step"))))
        return snap

    @torch.no_grad()
    def undo_step(self, snap: list[tuple]) -> None:
        """Put back the rows and state slots saved by :meth:`snapshot_rows` before the last step
        (a row selected for the first time keeps its slot, with zero state and zero steps)."""
        for p, rows, values, slots, *state in snap:
            p.index_copy_(0, rows, values)
            for key, saved in zip(("exp_avg", "exp_avg_sq", "step"), state):
                self.state[p][key].index_copy_(0, slots, saved)

    def set_rows_finite(self) -> Tensor:
        """A 0-d bool tensor (no host sync): whether every row set now, and its moments, hold finite
        values (a second moment that overflowed to inf leaves the weight finite but its row frozen)."""
        flags = []
        for p, r in (self._rows or {}).items():
            if r.numel():
                slots, st = self._slots[p].long(), self.state[p]
                flags += [torch.isfinite(p.index_select(0, r)).all(),
                          *(torch.isfinite(st[k].index_select(0, slots)).all() for k in ("exp_avg", "exp_avg_sq"))]
        return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)

    def row_updates(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, counts): every row of `p` that was ever selected and how many steps updated it
        (its slot's step count). Empty tensors for a parameter never selected."""
        rows = self.edited_rows(p)
        st = self.state.get(p)
        counts = st["step"][: rows.numel()].to(torch.int64) if rows.numel() else rows.clone()
        return rows.clone(), counts

    def edited_rows(self, p: Tensor) -> Tensor:
        """The rows of `p` that were ever selected, as a read-only view of the slot table (no copy:
        for callers on the hot path that index with it and do not keep it past the next step)."""
        st = self.state.get(p)
        if not st or "num_slots" not in st:
            return torch.zeros(0, dtype=torch.int64, device=p.device)
        return st["row_of_slot"][: st["num_slots"]]

    def state_bytes(self) -> int:
        """Bytes held by optimizer state tensors (moments, step counts, slot tables)."""
        return sum(
            v.numel() * v.element_size() for st in self.state.values() for v in st.values() if isinstance(v, Tensor)
        )

    def state_dict(self) -> dict:
        """torch's state dict plus ``"rows"``: the rows set, {param index: int64 (n,)}, None before set_rows."""
        sd = super().state_dict()
        rows = None
        if self._rows is not None:
            # the indices torch's state dict gives the params
            index = {id(p): i for g, sg in zip(self.param_groups, sd["param_groups"])
                     for p, i in zip(g["params"], sg["params"])}
            rows = {index[id(p)]: r.clone() for p, r in self._rows.items()}
        sd["rows"] = rows
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore moments, per-slot step counts, slot tables (dtypes kept: state stays float32) and rows.

        The rows come from the state dict; one without ``"rows"`` keeps the rows
        set now (slots looked up in the loaded tables), so that a save/load round
        trip followed by :meth:`step` updates the rows it would have updated.
        """
        id_map = self.check_state_dict(state_dict)
        saved_groups = state_dict["param_groups"]
        state: defaultdict = defaultdict(dict)
        for key, st in state_dict["state"].items():
            p = id_map[key]
            state[p] = {k: (v.to(p.device).clone() if isinstance(v, Tensor) else v) for k, v in st.items()}
        if "rows" in state_dict:
            saved_rows = state_dict["rows"]
            rows = None if saved_rows is None else {id_map[k]: r.to(id_map[k].device) for k, r in saved_rows.items()}
        else:
            rows = self._rows
        self.state = state
        for sg, g in zip(saved_groups, self.param_groups):
            g.update({k: v for k, v in sg.items() if k != "params"})
        # the slots of the rows are looked up in the loaded slot tables
        self._rows = None
        self._slots = {}
        self._args_stale = True
        if rows is not None:
            self.set_rows(rows)

    def check_state_dict(self, sd) -> dict:
        """{saved param index: param} for a state dict that fits this optimizer; else a one-line ValueError.

        Checks everything :meth:`load_state_dict` restores before it changes
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
        if len(saved_groups) != len(self.param_groups):
            bad(f"it has {len(saved_groups)} param groups but the optimizer has {len(self.param_groups)}")
        id_map: dict = {}
        for gi, (sg, g) in enumerate(zip(saved_groups, self.param_groups)):
            if not (isinstance(sg, Mapping) and isinstance(sg.get("params"), (list, tuple))
                    and all(isinstance(i, int) for i in sg["params"])):
                bad(f"param group {gi} is not a dict with a 'params' list of param indices")
            if len(sg["params"]) != len(g["params"]):
                bad(f"param group {gi} has {len(g['params'])} params but the state_dict's has {len(sg['params'])}")
            problem = _hyperparameter_problem(sg)
            if problem:
                bad(f"param group {gi}: {problem}")
            id_map.update(zip(sg["params"], g["params"]))
        if len(id_map) != sum(len(g["params"]) for g in self.param_groups):
            bad("its param groups list a param index more than once")
        position = self._positions()

        def name(k) -> str:
            p = id_map[k]
            return f"parameter #{position[id(p)]} of shape {tuple(p.shape)}"

        for k, st in sd["state"].items():
            if k not in id_map:
                bad(f"'state' has an entry for param index {k!r}, which no param group lists")
            if not isinstance(st, Mapping):
                bad(f"the state of {name(k)} is a {type(st).__name__}, not a dict")
            problem = _slot_state_problem(id_map[k], st)
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
                    _check_rows_of(name(k), p, r)
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

    # -------------------------------------------------------------------- step

    def _step_args(self, group: dict) -> list[tuple[list[Tensor], list[list[Tensor]], dict]]:
        """Kernel calls of ``group``: (params, [exp_avgs, exp_avg_sqs, steps, rows, slots], penalty kwargs).

        One call for the params without a penalty, one for those with; built
        once per row set and penalty, so a step only collects the gradients.
        """
        plain: list[tuple] = []
        penal: list[tuple] = []
        for p in group["params"]:
            rows = self._rows.get(p)
            if rows is None or rows.numel() == 0:
                continue
            st = self.state[p]
            n = st["num_slots"]
            item = (p, st["exp_avg"][:n], st["exp_avg_sq"][:n], st["step"][:n], rows, self._slots[p])
            (penal if (p in self._penalty and self._lam != 0.0) else plain).append(item)
        calls = []
        for items, with_penalty in ((plain, False), (penal, True)):
            if not items:
                continue
            params, *state = map(list, zip(*items))
            extra = {}
            if with_penalty:
                extra = dict(
                    hess=[self._penalty[p][0] for p in params],
                    ref_params=[self._penalty[p][1] for p in params],
                    lam=self._lam,
                )
            calls.append((params, state, extra))
        return calls

    @torch.no_grad()
    def step(self, closure=None):
        """Update the rows given to :meth:`set_rows` (they stay set until the next call).

        RuntimeError before any :meth:`set_rows`: that step would update nothing.
        """
        if self._rows is None:
            raise RuntimeError("MaskedAdamW: no rows are set, so this step would update nothing; "
                               "call set_rows(...) before step() (set_rows({}) for a step that updates nothing)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._args_stale:
            self._args = [self._step_args(g) for g in self.param_groups]
            self._checked_grads = [[None] * len(calls) for calls in self._args]
            self._plans = [[None] * len(calls) for calls in self._args]
            self._args_stale = False
        direct = self._update is ops.masked_adamw_ and plain_eager_mode()
        for gi, (group, calls) in enumerate(zip(self.param_groups, self._args)):
            beta1, beta2 = group["betas"]
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
            for ci, (params, state, extra) in enumerate(calls):
                grads = [p.grad for p in params]
                if direct and self._grads_checked(gi, ci, params, grads):
                    self._run_checked(gi, ci, params, grads, state, hyper, extra)
                    continue
                subset = any(g is None for g in grads)
                if subset:  # params without a gradient this step are skipped
                    keep = [i for i, g in enumerate(grads) if g is not None]
                    if not keep:
                        continue
                    params, grads = [params[i] for i in keep], [grads[i] for i in keep]
                    state = [[xs[i] for i in keep] for xs in state]
                    extra = {k: (v if k == "lam" else [v[i] for i in keep]) for k, v in extra.items()}
                if any(g.is_sparse for g in grads):
                    raise RuntimeError("MaskedAdamW does not support sparse gradients")
                self._update(params, grads, *state, **hyper, **extra)
                # the op checked every tensor of this call: later steps may skip to the kernel
                plain = not subset and all(is_plain_tensor(t) for t in params) and all(is_plain_tensor(g) for g in grads)
                self._checked_grads[gi][ci] = grads if plain else None
        return loss

    def _grads_checked(self, gi: int, ci: int, params: list[Tensor], grads: list) -> bool:
        """Whether call ``ci`` of group ``gi`` may run its kernel without the op's checks.

        Its params and state passed the op's checks on an earlier step (they are
        this optimizer's own tensors, rebuilt with every set_rows).  The gradients
        must be those same tensors, or new ones (``zero_grad(set_to_none=True)``)
        of their params' shape, dtype and device, dense and plain.
        """
        known = self._checked_grads[gi][ci]
        if known is None:
            return False
        if all(map(operator.is_, grads, known)):
            return True
        if not (grads_match_params(params, grads)
                and all(is_plain_tensor(g) and g.layout == torch.strided for g in grads)):
            return False
        self._checked_grads[gi][ci] = grads
        return True

    def _run_checked(self, gi: int, ci: int, params, grads, state, hyper, extra) -> None:
        """The backend kernel on already checked tensors (the op's path minus its per-tensor checks).

        A backend kernel with a ``prepare`` (triton) gets its launches prepared once
        per row set, for this call's state, rows, slots and penalty.
        """
        lr, beta1, beta2 = float(hyper["lr"]), float(hyper["beta1"]), float(hyper["beta2"])
        eps, weight_decay, lam = float(hyper["eps"]), float(hyper["weight_decay"]), float(extra.get("lam", 0.0))
        hess, ref_params = extra.get("hess"), extra.get("ref_params")
        check_masked_adamw_scalars(lr, beta1, beta2, eps, weight_decay, lam, hess, ref_params)
        kernel = kernel_for("masked_adamw_", params[0].device)
        prepare = getattr(kernel, "prepare", None)
        if prepare is None:
            kernel(params, grads, *state, lr, beta1, beta2, eps, weight_decay, hess, ref_params, lam)
            return
        plan = self._plans[gi][ci]
        if plan is None or plan[0] is not kernel:
            plan = (kernel, prepare(params, *state, hess, ref_params))
            self._plans[gi][ci] = plan
        plan[1](params, grads, lr, beta1, beta2, eps, weight_decay, lam)
