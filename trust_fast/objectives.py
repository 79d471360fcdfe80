"""Forget and retain objectives: noising, regression targets, losses.

All targets are produced without gradient; the only differentiable term of a loss is the edited
UNet's prediction. Predictions are compared in the model's own output space (epsilon or v), so
anchor mapping, negative guidance and self-distillation are valid for either parameterisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

RETAIN_OBJECTIVES = ("distill", "diffusion", "none")


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(N,) values shaped to broadcast over `like` (N, ...) in its dtype."""
    return values.view(-1, *[1] * (like.dim() - 1)).to(like.dtype)


def add_noise(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. x0, noise (N, C, H, W); t (N,) int64."""
    a = _per_sample(alphas_cumprod.to(x0.device)[t], x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def add_noise_flow(x0: Tensor, noise: Tensor, t: Tensor, num_train_timesteps: int) -> Tensor:
    """Flow matching (rectified flow, SD3): x_t = (1 - s) x0 + s noise with s = t / T; t (N,) int64."""
    s = _per_sample(t.to(x0.device, x0.dtype) / num_train_timesteps, x0)
    return (1 - s) * x0 + s * noise


def diffusion_target(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor | None,
                     prediction_type: str) -> Tensor:
    """What the model regresses in ordinary training: epsilon, v = sqrt(abar) eps - sqrt(1-abar) x0,
    the sample x0, or (flow matching) the velocity noise - x0."""
    if prediction_type == "flow":
        return noise - x0
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = _per_sample(alphas_cumprod.to(x0.device)[t], x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


class Noising:
    """The forward process of a pipeline's scheduler and what the model regresses under it, in one
    place for the engine and the attacks: x_t from x0 at random timesteps, and the diffusion target.

    Built from the scheduler's config: flow matching (``prediction_type == "flow"``, SD3/Flux) has
    no cumulative alphas; every other schedule noises with sqrt(abar_t)."""

    def __init__(self, scheduler, prediction_type: str, device: torch.device | str):
        self.prediction_type = prediction_type
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.alphas_cumprod = (None if prediction_type == "flow"
                               else scheduler.alphas_cumprod.to(device, torch.float32))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        if self.alphas_cumprod is None:
            return add_noise_flow(x0, noise, t, self.num_train_timesteps)
        return add_noise(x0, noise, t, self.alphas_cumprod)

    def noised(self, x0: Tensor, generator: torch.Generator, t: Tensor | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
        """(x_t, t, noise) for x0 (N, ...): t (N,) int64 drawn uniformly unless given, then the
        noise, both from `generator` (on its device, then moved to x0's)."""
        if t is None:
            t = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), generator=generator,
                              device=generator.device).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
        return self.add_noise(x0, noise, t), t, noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The ordinary training target of x_t = add_noise(x0, noise, t)."""
        return diffusion_target(x0, noise, t, self.alphas_cumprod, self.prediction_type)


def negative_guidance(pred_uncond: Tensor, pred_cond: Tensor, eta: float) -> Tensor:
    """ESD's target: eps_0(x_t, none) - eta * (eps_0(x_t, c) - eps_0(x_t, none))."""
    return pred_uncond - eta * (pred_cond - pred_uncond)


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error in float32 (targets are detached)."""
    return F.mse_loss(pred.float(), target.detach().float())


def check(retain: str) -> None:
    """A retain objective this module computes (forget objectives are registered pieces of a method:
    trust_fast.methods)."""
    if retain not in RETAIN_OBJECTIVES:
        raise ValueError(f"retain objective must be one of {RETAIN_OBJECTIVES}, got {retain!r}")


__all__ = ["Noising", "add_noise", "diffusion_target", "negative_guidance", "mse", "RETAIN_OBJECTIVES",
           "check"]
