"""Forget and retain objectives: noising, regression targets, losses.

All targets are produced without gradient; the only differentiable term of a loss is the edited
UNet's prediction. Predictions are compared in the model's own output space (epsilon or v), so
anchor mapping, negative guidance and self-distillation are valid for either parameterisation.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

FORGET_OBJECTIVES = ("anchor", "esd", "pseudo")
RETAIN_OBJECTIVES = ("distill", "diffusion", "none")


def add_noise(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. x0, noise (N, C, H, W); t (N,) int64."""
    a = alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1).to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def add_noise_flow(x0: Tensor, noise: Tensor, t: Tensor, num_train_timesteps: int) -> Tensor:
    """Flow matching (rectified flow, SD3): x_t = (1 - s) x0 + s noise with s = t / T; t (N,) int64."""
    s = (t.to(x0.device, x0.dtype) / num_train_timesteps).view(-1, 1, 1, 1)
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
        a = alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1).to(x0.dtype)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def negative_guidance(pred_uncond: Tensor, pred_cond: Tensor, eta: float) -> Tensor:
    """ESD's target: eps_0(x_t, none) - eta * (eps_0(x_t, c) - eps_0(x_t, none))."""
    return pred_uncond - eta * (pred_cond - pred_uncond)


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error in float32 (targets are detached)."""
    return F.mse_loss(pred.float(), target.detach().float())


def check(forget: str, retain: str) -> None:
    if forget not in FORGET_OBJECTIVES:
        raise ValueError(f"forget objective must be one of {FORGET_OBJECTIVES}, got {forget!r}")
    if retain not in RETAIN_OBJECTIVES:
        raise ValueError(f"retain objective must be one of {RETAIN_OBJECTIVES}, got {retain!r}")


__all__ = ["add_noise", "diffusion_target", "negative_guidance", "mse", "FORGET_OBJECTIVES", "RETAIN_OBJECTIVES",
           "check"]
