"""MaskedAdamW, the optimizer: its inputs (rows, penalty), its state as a whole and its step.

A param's slot tables are made and grown by :mod:`.slot_tables`; rows, hyperparameters and a saved
state are checked by :mod:`.state_checks`.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from .. import ops
from ..ops.adamw_checks import check_masked_adamw_scalars, grads_match_params
from ..ops.checks import DIAG_DTYPES, check_indices
from ..ops.library import is_plain_tensor, plain_eager_mode
from ..ops.registry import kernel_for
from ..ops.schema import rows_of
from . import slot_tables, state_checks


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
        problem = state_checks.hyperparameter_problem(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
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
            from ..localize import compile_op_layer

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
            state_checks.check_rows_of(f"parameter #{position[id(p)]} of shape {tuple(p.shape)}", p, r)
            # a private copy: changing the caller's tensor later does not change the rows set here
            new[p] = r.to(device=p.device, dtype=torch.int64, copy=True)
            by_device.setdefault(p.device, []).append(p)
        slots: dict[Tensor, Tensor] = {}
        for device, ps in by_device.items():
            check_indices("rows[param]", [new[p] for p in ps], [rows_of(p) for p in ps], device)
            slots.update(zip(ps, slot_tables.assign_slots(self.state, ps, [new[p] for p in ps])))
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
        """{saved param index: param} for a state dict that fits this optimizer; else a one-line
        ValueError (:func:`.state_checks.check_state_dict`: it checks everything :meth:`load_state_dict`
        restores before it changes anything)."""
        return state_checks.check_state_dict(sd, self.param_groups, self._positions())

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
