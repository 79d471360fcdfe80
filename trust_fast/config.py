"""TrustConfig: every knob of the engine, as one dataclass with public flat names.

Methods (trust_fast.methods) are presets of it; the CLI's flags are made from it; checkpoints and
benchmark records store it as a dict (:func:`effective_fields` compares two of them).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields

from . import objectives
from .defaults import ADV_MODES, AMP_MODES
from .hessian import HESSIAN_MODES

# torch.compile backends whose steps are tested equal to eager ones (tests/test_dropin_api.py); inductor
# is not among them: on torch 2.13 it gives wrong weight gradients through the engine's passes
COMPILE_BACKENDS = ("aot_eager", "eager")
LOCALIZATIONS = ("dynamic", "static", "dense")
ADV_PREFIX_AUTO = 5  # TrustConfig(adv_prefix=None): the adversary's prefix length
X0_SOURCES = ("forget", "anchor", "forget+anchor")


# TrustConfig fields added after configs were first saved (checkpoints, benchmark records) whose
# default is not what the code did before them: a saved config without one ran with this value
# (a saved config without any other field ran with that field's default)
PREDATED_FIELDS = {"x0_retain_per_prompt": None}  # retain prompts cached as many images as forget prompts


def effective_fields(fields: dict) -> dict:
    """A TrustConfig as a dict (saved or live) with the automatic values that do not depend on the
    model resolved as the engine resolves them: adv_prefix None -> ADV_PREFIX_AUTO and
    x0_retain_per_prompt None -> x0_per_prompt. Two configs train alike when these agree."""
    out = dict(fields)
    if "adv_prefix" in out and out["adv_prefix"] is None:
        out["adv_prefix"] = ADV_PREFIX_AUTO
    if "x0_retain_per_prompt" in out and out["x0_retain_per_prompt"] is None:
        out["x0_retain_per_prompt"] = out.get("x0_per_prompt")
    return out


def _of_annotated_type(value, annotation: str) -> bool:
    """Whether `value` fits a TrustConfig field's annotation (``int``, ``float | None``,
    ``tuple[str, ...] | None``...): an int is a float, a bool is neither an int nor a float."""
    for option in (a.strip() for a in annotation.split("|")):
        if option == "None" and value is None:
            return True
        if option == "bool" and isinstance(value, bool):
            return True
        if isinstance(value, bool):
            continue
        if (option == "int" and isinstance(value, int)) or (option == "float" and isinstance(value, (int, float))) \
                or (option == "str" and isinstance(value, str)):
            return True
        if option.startswith("tuple[") and isinstance(value, (tuple, list)):
            inner = [a.strip() for a in option[6:-1].split(",")]
            kinds = [inner[0]] * len(value) if inner[-1] == "..." else inner
            if len(kinds) == len(value) and all(_of_annotated_type(v, k) for v, k in zip(value, kinds)):
                return True
    return False


@dataclass
class TrustConfig:
    """Every knob of the engine. Defaults are TRUST's, tuned on the built-in shapes model.

    Methods differ only in these fields: :func:`trust_fast.methods.config` builds SalUn and ESD."""

    method: str = "trust"
    steps: int = 60
    lr: float = 1e-2
    batch_size: int = 16               # forget batch per step
    retain_batch_size: int = 32
    alpha: float = 6.0                 # weight of the retain loss
    retain_neighbors: float = 0.5      # "A+B"/"A|B": fraction of a retain batch drawn from A-without-B, B-without-A
    forget_objective: str = "anchor"   # anchor | esd (negative guidance) | pseudo (SalUn: current model on anchor)
    retain_objective: str = "distill"  # distill (frozen model) | diffusion (noise target) | none
    eta: float = 1.0                   # negative-guidance scale of the esd objective
    targets: tuple[str, ...] | None = None  # glob patterns of the edited modules; None: the model family's
    localization: str = "dynamic"      # dynamic (TRUST) | static (SalUn mask) | dense (all target weights)
    xi: float = 2.0                    # z-score threshold of dynamic localization
    max_fraction: float | None = None  # optional cap on the fraction of a layer's rows selected per step
    loc_interval: int = 1              # re-estimate the rows every this many steps
    saliency: str = "g"                # g: mean |grad| per row; gw: mean |grad * weight|
    mask_fraction: float = 0.5         # static: fraction of weights in the SalUn mask
    hessian: str = "diag"              # hvp | diag | none
    lam: float = 1.0                   # weight of the Hessian penalty
    hvp_interval: int = 1              # hvp: refresh lambda * H Delta every this many steps
    hessian_fd_eps: float = 1e-3       # FSDP2 (diag): step of the finite-difference products H z
    diag_interval: int = 10            # diag: fold new Hutchinson probes in every this many steps
    diag_samples: int = 1
    hessian_dtype: str = "bfloat16"    # storage of the diag Hessian estimate: bfloat16 (half the memory; float32
                                       # math in the ops) | float32
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    adv_prefix: int | None = None      # adversarial soft prefix of this many tokens (0: off; None: ADV_PREFIX_AUTO);
                                       # in every text encoder of the family (trust_fast.softprompt)
    adv_steps: int = 10                # Adam steps on the prefix per refresh (it is warm-started)
    adv_interval: int = 5              # refresh the adversarial prefix every this many steps
    adv_lr: float = 0.01
    adv_fraction: float = 0.5          # fraction of a forget batch conditioned on the prefixed prompts
    adv_population: int = 1            # independent prefixes (own random starts); a refresh steps one of them in
                                       # turn, and each adversarial row of a batch draws one
    adv_retain_fraction: float = 0.0   # fraction of a retain batch conditioned on retain prompts behind a prefix
                                       # (distilled to the original model there: the prefix may not change them)
    adv_mode: str = "prefix"           # prefix: a soft prefix of adv_prefix tokens shared by the forget prompts |
                                       # tokens: an offset on every input token embedding of each forget prompt
                                       # (the embedding attack's search space; on when adv_prefix > 0)
    x0_per_prompt: int = 8             # cached data-free images per forget and anchor prompt
    x0_retain_per_prompt: int | None = None  # cached images per retain prompt (None: x0_per_prompt)
    x0_steps: int = 5                  # DDIM steps used to sample them
    x0_guidance: float | None = None   # CFG scale for them (None: the pipeline's default)
    x0_from: str = "forget+anchor"     # which cached images a forget batch is noised from
    min_row_updates: int = 3           # finalize(): rows updated fewer times go back to their original values
    seed: int = 0
    compile: bool = False              # run the op layer (localization, masked update) as torch.compile graphs
    compile_unet: bool | str = False   # torch.compile the denoiser with this backend (COMPILE_BACKENDS; the
                                       # passes of Hessian steps run eager); inductor is refused (wrong gradients)
    channels_last: bool = False        # convolutions in channels-last memory format (measured slower on CPUs)
    grad_checkpointing: bool = False   # recompute activations in backward (less memory, more time; diffusers models)
    hessian_micro_batch: int = 0       # steps that differentiate twice run the retain batch this many images at a
                                       # time (the same gradient and Hessian products, the activations of one
                                       # micro-batch in memory; 0: the whole batch in one pass)
    amp: str = "auto"                  # autocast of every denoiser pass of a float32 model: bf16 | fp16 | off;
                                       # auto: bf16 on a CUDA device that supports it, off elsewhere

    def validate(self) -> None:
        for f in fields(self):
            if not _of_annotated_type(getattr(self, f.name), f.type):
                raise TypeError(f"TrustConfig.{f.name} must be {f.type}, got {getattr(self, f.name)!r} "
                                f"({type(getattr(self, f.name)).__name__})")
        objectives.check(self.forget_objective, self.retain_objective)
        for name, value, allowed in (("localization", self.localization, LOCALIZATIONS),
                                     ("hessian", self.hessian, HESSIAN_MODES), ("x0_from", self.x0_from, X0_SOURCES),
                                     ("saliency", self.saliency, ("g", "gw")), ("amp", self.amp, AMP_MODES),
                                     ("hessian_dtype", self.hessian_dtype, ("bfloat16", "float32")),
                                     ("adv_mode", self.adv_mode, ADV_MODES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for name in ("steps", "batch_size", "retain_batch_size", "loc_interval", "hvp_interval", "diag_interval",
                     "diag_samples", "x0_per_prompt", "x0_steps", "adv_steps", "adv_interval", "adv_population",
                     "min_row_updates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not math.isfinite(self.xi):
            raise ValueError(f"xi must be a finite number, got {self.xi}")
        if self.x0_retain_per_prompt is not None and (not isinstance(self.x0_retain_per_prompt, int)
                                                      or self.x0_retain_per_prompt < 1):
            raise ValueError(f"x0_retain_per_prompt must be None or an int >= 1, got {self.x0_retain_per_prompt!r}")
        if self.max_fraction is not None and not 0.0 < self.max_fraction <= 1.0:
            raise ValueError(f"max_fraction must be in (0, 1], got {self.max_fraction}")
        if not isinstance(self.hessian_micro_batch, int) or self.hessian_micro_batch < 0:
            raise ValueError(f"hessian_micro_batch must be an int >= 0, got {self.hessian_micro_batch!r}")
        for name in ("retain_neighbors", "adv_fraction", "adv_retain_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.adv_prefix is not None and self.adv_prefix < 0:
            raise ValueError(f"adv_prefix must be >= 0, got {self.adv_prefix}")
        if self.adv_mode == "tokens" and self.adv_retain_fraction > 0:
            raise ValueError("adv_retain_fraction needs adv_mode='prefix' (token offsets belong to the forget prompts)")
        if self.adv_mode == "tokens" and self.adv_population > 1:
            raise ValueError("adv_population > 1 needs adv_mode='prefix' (token offsets all start at the prompts "
                             "themselves, so a population would be copies)")
        for name in ("lr", "alpha", "lam", "eta", "weight_decay", "adv_lr"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not isinstance(self.compile_unet, (bool, str)) or self.compile_unet == "":
            raise ValueError(f"compile_unet must be a bool or a torch.compile backend name, got {self.compile_unet!r}")
        if self.compile_unet and self.compile_unet not in COMPILE_BACKENDS:
            backend = "inductor" if self.compile_unet is True else self.compile_unet
            raise ValueError(f"compile_unet={backend!r} is refused: with inductor the compiled denoiser's weight "
                             "gradients are wrong here (a tiny SD UNet: the same loss, zero gradients for its mid "
                             f"block); the backends checked to match eager are {', '.join(COMPILE_BACKENDS)}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {tuple(self.betas)}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps}")
        if not 0.0 < self.mask_fraction <= 1.0:
            raise ValueError(f"mask_fraction must be in (0, 1], got {self.mask_fraction}")
        if self.x0_guidance is not None and not (math.isfinite(self.x0_guidance) and self.x0_guidance >= 0):
            raise ValueError(f"x0_guidance must be None or a finite number >= 0, got {self.x0_guidance}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.targets is not None and (not self.targets or not all(t.strip() for t in self.targets)):
            raise ValueError(f"targets must be None or non-empty glob patterns, got {tuple(self.targets)!r}")
        if not (math.isfinite(self.hessian_fd_eps) and self.hessian_fd_eps > 0):
            raise ValueError(f"hessian_fd_eps must be a finite number > 0, got {self.hessian_fd_eps}")
        if self.hessian != "none" and self.retain_objective == "none":
            raise ValueError("a Hessian regularizer needs a retain objective (retain_objective='none')")

    def replace(self, **changes) -> "TrustConfig":
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown TrustConfig field(s): {unknown}")
        out = copy.copy(self)
        for k, v in changes.items():
            setattr(out, k, tuple(v) if k in ("targets", "betas") and v is not None else v)
        return out


__all__ = ["TrustConfig", "effective_fields", "PREDATED_FIELDS", "LOCALIZATIONS", "X0_SOURCES", "ADV_PREFIX_AUTO",
           "COMPILE_BACKENDS"]
