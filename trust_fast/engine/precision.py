"""Mixed precision of a run: the autocast dtype, float32 master weights of half-precision targets,
the dynamic float16 loss scale, and the half-precision leaf copies a Hessian step differentiates.

Half-precision models (float16, bfloat16) train on float32 master values of the target weights:
the optimizer steps the masters and the model's rows are refreshed from them, so updates smaller
than a half-precision step are not lost. float16 also scales its losses (dynamic: halved after a
step with an overflow, doubled after LOSS_SCALE_GROWTH good ones).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

LOSS_SCALE_INIT = 2.0 ** 16   # float16 models: the first loss scale
LOSS_SCALE_GROWTH = 100      # good steps between doublings of the loss scale
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_CASTABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def amp_dtype(mode: str, device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype of TrustConfig.amp `mode` for a denoiser on `device` holding `dtype`
    weights (None: no autocast). Autocast is mixed precision for float32 models: a half-precision
    model already runs in half precision (auto resolves to off; bf16/fp16 are refused)."""
    if mode == "off":
        return None
    if dtype != torch.float32:
        if mode == "auto":
            return None
        raise ValueError(f"amp={mode!r} autocasts a float32 model; this one holds {dtype} weights (use amp='off')")
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return _AMP_DTYPES[mode]


class Precision:
    """Masters, loss scale and Hessian leaves of the target parameters `params` (one per target
    param, named `names`, of the modules `modules`), under autocast dtype `amp`."""

    def __init__(self, params: list[Tensor], names: list[str], modules: list[torch.nn.Module],
                 amp: torch.dtype | None):
        self.params, self.names, self.amp_dtype = params, names, amp
        half = any(p.dtype in (torch.float16, torch.bfloat16) for p in params)
        self.master: list[Tensor] | None = [p.detach().float().clone() for p in params] if half else None
        fp16 = amp == torch.float16 or any(p.dtype == torch.float16 for p in params)
        self.loss_scale: float | None = LOSS_SCALE_INIT if fp16 else None
        self.good_steps = 0
        # Hessian steps under amp differentiate w.r.t. half-precision leaf copies of the target
        # weights that autocast would cast anyway (float32 Linear/conv weights and biases): the same
        # values reach the same ops, but the gradient and the Hessian products come out in half
        # precision, half the memory of the run's peak (see :meth:`hessian_leaves`)
        self.castable = [isinstance(m, _CASTABLE) and p.dtype == torch.float32 for m, p in zip(modules, params)]
        self.half_hessian = amp is not None
        self.leaves: dict[str, Tensor] | None = None  # the leaf copies while a Hessian step runs

    @property
    def opt_params(self) -> list[Tensor]:
        """What the optimizer steps: the float32 masters, or the parameters themselves."""
        return self.master if self.master is not None else self.params

    def grads(self, loss: Tensor) -> list[Tensor]:
        """Gradient of `loss` w.r.t. the target parameters (float16: through the loss scale, returned
        unscaled in float32; zeros for a parameter the loss does not reach)."""
        if self.loss_scale is not None:
            gs = torch.autograd.grad(loss * self.loss_scale, self.params, allow_unused=True)
            return [g.float() / self.loss_scale if g is not None else torch.zeros_like(p, dtype=torch.float32)
                    for g, p in zip(gs, self.params)]
        gs = torch.autograd.grad(loss, self.params, allow_unused=True)
        return [g if g is not None else torch.zeros_like(p) for g, p in zip(gs, self.params)]

    def unscale(self, tensors: list[Tensor]) -> list[Tensor]:
        """Tensors computed through the loss scale, unscaled (float32); as they are without one."""
        return tensors if self.loss_scale is None else [t.float() / self.loss_scale for t in tensors]

    def update_loss_scale(self, overflow: bool) -> None:
        if self.loss_scale is None:
            return
        if overflow:
            self.loss_scale, self.good_steps = max(1.0, self.loss_scale / 2), 0
        else:
            self.good_steps += 1
            if self.good_steps % LOSS_SCALE_GROWTH == 0:
                self.loss_scale = min(LOSS_SCALE_INIT * 2 ** 8, self.loss_scale * 2)

    @torch.no_grad()
    def refresh_from_master(self, rows: list[Tensor] | None) -> None:
        """Write the float32 masters into the model's half-precision target weights: the selected
        rows of each target param (`rows` one tensor per param), all rows after a dense step."""
        if self.master is None:
            return
        for p, q, r in zip(self.params, self.master, rows or [None] * len(self.params)):
            if r is None:
                p.copy_(q)
            elif r.numel():
                p.index_copy_(0, r, q.index_select(0, r).to(p.dtype))

    @contextlib.contextmanager
    def hessian_leaves(self, on: bool):
        """While active (and `on`, under amp), the retain pass of a Hessian step runs on leaf copies
        of the castable target params in the amp dtype; yields what to differentiate w.r.t. (one
        tensor per target param: its leaf, or the param itself). Autocast would cast those params
        to the same values on entry to the same ops, so the loss, the gradient and the Hessian
        products are the ones of the float32 params (a cast's backward only widens them), held in
        half precision: the full-size gradient and H z of the Hessian step take half the memory."""
        if not (on and self.half_hessian and any(self.castable)):
            yield self.params
            return
        wrt = [p.detach().to(self.amp_dtype).requires_grad_(True) if c else p
               for p, c in zip(self.params, self.castable)]
        self.leaves = {n: w for n, w, c in zip(self.names, wrt, self.castable) if c}
        try:
            yield wrt
        finally:
            self.leaves = None

    # ------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {"master": None if self.master is None else [q.detach().cpu().clone() for q in self.master],
                "loss_scale": None if self.loss_scale is None else {"scale": self.loss_scale,
                                                                     "good_steps": self.good_steps}}

    def check_state(self, f, state: dict) -> None:
        """Checks a saved state against this run before anything is restored (`f`: the checkpoint's
        field checker, trust_fast.checkpoint.Fields)."""
        if self.master is not None:
            f.tensors(state.get("master"), "float32 master weight", self.master, floating=True)
        if self.loss_scale is not None:
            ls = f.of_type(state.get("loss_scale"), "loss_scale", dict)
            if not (isinstance(ls.get("scale"), float) and math.isfinite(ls["scale"]) and ls["scale"] >= 1):
                f.damaged("'loss_scale.scale'", f"is {ls.get('scale')!r}, expected a float >= 1")
            f.count(ls.get("good_steps"), "loss_scale.good_steps")

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if self.master is not None:
            for q, v in zip(self.master, state["master"], strict=True):
                q.copy_(v.to(q.device, q.dtype))
        if self.loss_scale is not None:
            self.loss_scale = float(state["loss_scale"]["scale"])
            self.good_steps = int(state["loss_scale"]["good_steps"])
