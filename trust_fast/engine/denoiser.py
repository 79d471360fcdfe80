"""The denoiser as the engine runs it: the edited model's prediction, the frozen original's, and
their shared pass (autocast, compiled forward, weights swapped in by name).

The frozen model eps_0 is the same module evaluated with the saved original target weights swapped
in by ``torch.func.functional_call``, so no second denoiser is held in memory. Under amp every pass
runs in autocast with half-precision copies of the frozen matmul and convolution weights swapped in
the same way. The family adapter (trust_fast.models) turns conditioning into the denoiser's inputs
and its output into a prediction shaped like the noisy latents.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.func import functional_call

_CASTABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


class Denoiser:
    """Passes of the family's denoiser for the engine.

    Args:
        family: the pipeline's family adapter (``family.denoiser`` is the module).
        amp_dtype: autocast dtype of every pass (None: no autocast).
        trained: the target parameters (their frozen copies live in `frozen`).
        frozen: the original target weights by parameter name (None: the method keeps none).
        channels_last, compile_backend: the config's fast paths (compile_backend False: eager).
        sharded_frozen: FSDP2: a function returning the context that swaps theta_0 into the local
            shards for a frozen pass (every rank takes part); None without sharding.
    """

    def __init__(self, family, amp_dtype: torch.dtype | None, trained: list[Tensor], frozen: dict | None,
                 channels_last: bool = False, compile_backend: bool | str = False, sharded_frozen=None):
        self.family, self.module = family, family.denoiser
        self.device, self.dtype = self.module.device, self.module.dtype
        self.amp_dtype, self.channels_last = amp_dtype, channels_last
        self.sharded_frozen = sharded_frozen
        self.forward = self.module
        if compile_backend:
            # the target weights are updated in place and the frozen ones swapped in per pass: the
            # compiled graph takes parameters as inputs, so neither recompiles
            backend = "inductor" if compile_backend is True else compile_backend
            self.forward = torch.compile(self.module, backend=backend)
        # amp: half-precision copies of the frozen matmul/conv weights, made once, stand in for them
        # on every pass. Autocast caches no cast of a weight without grad, so otherwise every pass
        # would cast them again and every graph would hold its own copies (1.2 GB per graph for
        # SD-1.5 in bf16).
        self.amp_weights = self._half_frozen_weights(trained) if amp_dtype is not None else None
        self.frozen = frozen
        self.frozen_weights = ({**(self.amp_weights or {}), **frozen} if frozen is not None else self.amp_weights)

    def _half_frozen_weights(self, trained: list[Tensor]) -> dict[str, Tensor]:
        """amp_dtype copies of the weights and biases of the denoiser's linear and convolution
        layers outside the targets (the ops autocast runs in half precision anyway)."""
        ids = {id(p) for p in trained}
        out = {}
        for name, module in self.module.named_modules():
            if isinstance(module, _CASTABLE):
                for pname, p in module.named_parameters(recurse=False):
                    if id(p) not in ids and p.dtype == torch.float32:
                        out[f"{name}.{pname}" if name else pname] = p.detach().to(self.amp_dtype)
        return out

    def __call__(self, noisy: Tensor, t: Tensor, cond: Tensor, weights: dict | None = None,
                 eager: bool = False) -> Tensor:
        """One denoiser pass (under autocast when amp is on; the prediction comes back in the
        model's dtype), with `weights` swapped in when given. `eager`: not through the compiled
        denoiser (a graph to be differentiated twice: compiled backwards are not differentiable)."""
        inputs = self.family.denoiser_inputs(noisy, t, cond)
        forward = self.module if eager else self.forward
        first = next(iter(inputs))
        if self.channels_last and inputs[first].dim() == 4:  # not a packed (N, tokens, D) input (Flux)
            inputs[first] = inputs[first].contiguous(memory_format=torch.channels_last)
        with (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
              else contextlib.nullcontext()):
            if weights is None:
                out = forward(**inputs)
            else:  # a compiled denoiser holds the model as _orig_mod
                prefix = "_orig_mod." if forward is not self.module else ""
                out = functional_call(forward, {prefix + k: v for k, v in weights.items()}, (), inputs, strict=False)
        return self.family.prediction(out, noisy).to(self.dtype)

    def pred(self, noisy: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The edited model's prediction, with grad to the target parameters."""
        return self(noisy, t, cond, self.amp_weights)

    def pred_with(self, noisy: Tensor, t: Tensor, cond: Tensor, leaves: dict[str, Tensor] | None) -> Tensor:
        """The edited model's prediction, eager, with `leaves` (leaf copies of target weights by
        name) swapped in: the pass a Hessian step differentiates twice."""
        weights = self.amp_weights if leaves is None else {**(self.amp_weights or {}), **leaves}
        return self(noisy, t, cond, weights, eager=True)

    def frozen_pred(self, noisy: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """eps_0 (or v_0): the original model's prediction, without grad (an ordinary tensor: it is
        made in inference mode and copied out, so that losses may save it for backward). FSDP2:
        theta_0 is copied into the local shards for the pass (every rank takes part)."""
        if self.sharded_frozen is not None:
            with torch.no_grad(), (self.sharded_frozen() if self.frozen is not None else contextlib.nullcontext()):
                return self(noisy, t, cond)
        with torch.inference_mode():
            out = self(noisy, t, cond, self.frozen_weights)
        return out.clone()
