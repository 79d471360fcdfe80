"""TrustConfig: every knob of the engine, as one dataclass with public flat names.

Methods (trust_fast.methods) are presets of it; the CLI's flags are made from its fields' metadata
(trust_fast.cli.config_flags); checkpoints and benchmark records store it as a dict
(:func:`effective_fields` compares two of them).

This module imports nothing heavy at import time (`trust-fast --help` reads the fields without torch).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields

from .defaults import ADV_MODES, AMP_MODES

# torch.compile backends whose steps are tested equal to eager ones (tests/engine/test_dropin_api.py); inductor
# is not among them: on torch 2.13 it gives wrong weight gradients through the engine's passes
COMPILE_BACKENDS = ("aot_eager", "eager")
ADV_PREFIX_AUTO = 5  # TrustConfig(adv_prefix=None): the adversary's prefix length
X0_SOURCES = ("forget", "anchor", "forget+anchor")
# trust_fast.hessian.HESSIAN_MODES, spelled out because that module imports torch (tests/cli/test_cli_flags.py
# checks that the two agree)
_HESSIAN_MODES = ("hvp", "diag", "none")

# the groups of TrustConfig's fields (each field's metadata["group"]), in the order validate() checks them
PARTIAL_MODES = ("off", "on", "auto")  # TrustConfig.partial_prompts
GROUPS = ("method", "localization", "hessian", "optimizer", "adversary", "data-free cache", "performance")


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


def _knob(group: str, default, help: str, **extra):
    """A TrustConfig field: its default and its metadata, `group` (one of GROUPS) and `help` (what it
    means), plus optionally `choices` (the values validate() accepts) and `flag` (the field is a flag
    of `trust-fast unlearn`; the dict holds argparse options beyond those its type gives)."""
    if group not in GROUPS:
        raise ValueError(f"unknown TrustConfig group {group!r}; the groups are {GROUPS}")
    return field(default=default, metadata={"group": group, "help": help, **extra})


@dataclass
class TrustConfig:
    """Every knob of the engine. Defaults are TRUST's, tuned on the built-in shapes model.

    Methods differ only in these fields: :func:`trust_fast.methods.config` builds SalUn and ESD.
    Each field's metadata says its group (GROUPS), what it means (help) and, where it has them,
    its allowed values (choices) and the options of its `trust-fast unlearn` flag (flag)."""

    method: str = _knob("method", "trust", "the method this config is a preset of (trust_fast.methods); recorded "
                        "in reports")
    steps: int = _knob("method", 60, "optimizer steps", flag={})
    lr: float = _knob("optimizer", 1e-2, "learning rate", flag={})
    batch_size: int = _knob("method", 16, "forget images per step", flag={})
    retain_batch_size: int = _knob("method", 32, "retain images per step")
    alpha: float = _knob("method", 6.0, "weight of the retain loss", flag={})
    retain_neighbors: float = _knob("method", 0.5, "A+B, A|B: fraction of a retain batch drawn from A-without-B "
                                    "and B-without-A", flag={})
    forget_objective: str = _knob("method", "anchor", "anchor (map the concept's prompts to their anchors) | esd "
                                  "(negative guidance) | pseudo (SalUn: the current model on the anchor)")
    retain_objective: str = _knob("method", "distill", "distill (match the frozen model) | diffusion (the noise "
                                  "target) | none")
    partial_prompts: str = _knob("method", "off", "the prompts that name only part of the concept (\"a red\" for "
                                 "red+circle, the empty prompt) also learn to forget it: on | off | auto (on for A+B "
                                 "and A|B)", choices=PARTIAL_MODES, flag={})
    partial_fraction: float = _knob("method", 0.75, "with partial prompts: the fraction of a forget batch drawn from "
                                    "them (the rest from the prompts that name the whole concept)", flag={})
    eta: float = _knob("method", 1.0, "negative-guidance scale of the esd objective")
    targets: tuple[str, ...] | None = _knob(
        "localization", None, "glob patterns of the modules to edit, or the family's sets @default "
        "and @cross_attention (None: @default; on UNets *attn2.to_q,*attn2.to_k,*attn2.to_v,*ff.net.0.proj,"
        "*ff.net.2)", flag={})
    localization: str = _knob("localization", "dynamic", "dynamic (TRUST: rows re-selected as training goes) | "
                              "static (a SalUn mask, once) | dense (every target weight), or a registered one "
                              "(trust_fast.methods.register_localization)")
    xi: float = _knob("localization", 2.0, "z-score threshold of dynamic localization", flag={})
    max_fraction: float | None = _knob("localization", None, "cap on the fraction of a layer's rows selected per "
                                       "step, in (0, 1] (None: no cap)", flag={})
    loc_interval: int = _knob("localization", 1, "re-localize every this many steps", flag={})
    saliency: str = _knob("localization", "g", "a row's saliency: g, its mean |grad|; gw, its mean |grad * weight|",
                          choices=("g", "gw"))
    mask_fraction: float = _knob("localization", 0.5, "static: fraction of the weights in the SalUn mask")
    hessian: str = _knob("hessian", "diag", "Hessian regularizer: hvp (exact products by double backward) | diag "
                         "(a Hutchinson estimate of the diagonal) | none", choices=_HESSIAN_MODES, flag={})
    lam: float = _knob("hessian", 1.0, "weight of the Hessian penalty", flag={})
    hvp_interval: int = _knob("hessian", 1, "hvp: refresh lambda * H Delta every this many steps")
    hessian_fd_eps: float = _knob("hessian", 1e-3, "FSDP2 (diag): step of the finite-difference products H z")
    diag_interval: int = _knob("hessian", 10, "diag: fold new Hutchinson probes in every this many steps")
    diag_samples: int = _knob("hessian", 1, "diag: Hutchinson probes per refresh")
    hessian_dtype: str = _knob("hessian", "bfloat16", "storage of the diag Hessian estimate: bfloat16 (half the "
                               "memory; float32 math in the ops) | float32", choices=("bfloat16", "float32"))
    betas: tuple[float, float] = _knob("optimizer", (0.9, 0.999), "AdamW's moment decays")
    eps: float = _knob("optimizer", 1e-8, "AdamW's denominator epsilon")
    weight_decay: float = _knob("optimizer", 0.0, "AdamW's decoupled weight decay")
    adv_prefix: int | None = _knob("adversary", None, "train against an adversarial soft prefix of this many "
                                   "tokens, in every text encoder of the family (trust_fast.softprompt; 0: off; "
                                   f"None: {ADV_PREFIX_AUTO})", flag={"metavar": "K"})
    adv_steps: int = _knob("adversary", 10, "Adam steps on the prefix per refresh (it is warm-started)")
    adv_interval: int = _knob("adversary", 5, "refresh the adversarial prefix every this many steps")
    adv_lr: float = _knob("adversary", 0.01, "learning rate of the adversary's Adam steps")
    adv_fraction: float = _knob("adversary", 0.5, "fraction of a forget batch conditioned on the prefixed prompts")
    adv_population: int = _knob("adversary", 1, "independent prefixes (own random starts); a refresh steps one of "
                                "them in turn, and each adversarial row of a batch draws one")
    adv_retain_fraction: float = _knob("adversary", 0.0, "fraction of a retain batch conditioned on retain prompts "
                                       "behind a prefix (distilled to the original model there: the prefix may not "
                                       "change them)")
    adv_mode: str = _knob("adversary", "prefix", "the adversary's search space: prefix (a soft prefix of adv_prefix "
                          "tokens shared by the forget prompts) or tokens (an offset on every token embedding of each "
                          "forget prompt, what the embedding attack moves; on when adv_prefix > 0)",
                          choices=ADV_MODES, flag={})
    x0_per_prompt: int = _knob("data-free cache", 8, "data-free images cached per forget and anchor prompt", flag={})
    x0_retain_per_prompt: int | None = _knob("data-free cache", None, "data-free images cached per retain prompt "
                                             "(None: as x0_per_prompt)", flag={"metavar": "N"})
    x0_steps: int = _knob("data-free cache", 5, "DDIM steps that sample the cached images", flag={})
    x0_guidance: float | None = _knob("data-free cache", None, "CFG scale of the cached images (None: the "
                                      "pipeline's default)")
    x0_from: str = _knob("data-free cache", "forget+anchor", "which cached images a forget batch is noised from",
                         choices=X0_SOURCES)
    min_row_updates: int = _knob("localization", 3, "at the end (finalize), rows updated fewer times than this "
                                 "return to their original weights", flag={"metavar": "N"})
    seed: int = _knob("method", 0, "seed of every random draw of the run")
    compile: bool = _knob("performance", False, "run the op layer (localization, masked update) as torch.compile "
                          "graphs")
    compile_unet: bool | str = _knob(
        "performance", False, f"torch.compile the denoiser with this backend ({', '.join(COMPILE_BACKENDS)}; the "
        "passes of Hessian steps run eager); inductor is refused: its weight gradients were wrong through the "
        "engine's passes", flag={"nargs": "?", "const": COMPILE_BACKENDS[0], "metavar": "BACKEND"})
    channels_last: bool = _knob("performance", False, "convolutions in channels-last memory format (measured slower "
                                "on CPUs)", flag={})
    grad_checkpointing: bool = _knob("performance", False, "recompute activations in backward: less memory, more "
                                     "time (diffusers models)", flag={})
    hessian_micro_batch: int = _knob("performance", 0, "steps that differentiate twice run the retain batch this "
                                     "many images at a time: the same gradient and Hessian products with the "
                                     "activations of one micro-batch in memory (0: the whole batch in one pass)",
                                     flag={"metavar": "N"})
    amp: str = _knob("performance", "auto", "autocast of every denoiser pass of a float32 model: bf16 | fp16 | off; "
                     "auto: bf16 on a CUDA device that supports it, off elsewhere (bf16 also pays on CPUs with "
                     "AVX512-BF16 or AMX)", choices=AMP_MODES, flag={})

    def validate(self) -> None:
        """Raise TypeError for a field whose value does not fit its annotation, else ValueError for
        the first value (group by group, GROUPS' order) that no run can use."""
        for f in fields(self):
            if not _of_annotated_type(getattr(self, f.name), f.type):
                raise TypeError(f"TrustConfig.{f.name} must be {f.type}, got {getattr(self, f.name)!r} "
                                f"({type(getattr(self, f.name)).__name__})")
        for group in GROUPS:
            _check_choices(self, group)
            _GROUP_CHECKS[group](self)

    def replace(self, **changes) -> "TrustConfig":
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown TrustConfig field(s): {unknown}")
        out = copy.copy(self)
        for k, v in changes.items():
            setattr(out, k, tuple(v) if k in ("targets", "betas") and v is not None else v)
        return out


# ------------------------------------------------------------------------------------------------ validation
# (each check runs after the type check: a value here has its field's type)

def _check_choices(cfg: TrustConfig, group: str) -> None:
    """The group's fields that have `choices` hold one of them."""
    for f in fields(cfg):
        allowed = f.metadata.get("choices")
        if f.metadata["group"] == group and allowed is not None and getattr(cfg, f.name) not in allowed:
            raise ValueError(f"{f.name} must be one of {allowed}, got {getattr(cfg, f.name)!r}")


def _require_at_least_one(cfg: TrustConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")


def _require_fraction(cfg: TrustConfig, *names: str) -> None:
    for name in names:
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {getattr(cfg, name)}")


def _require_finite_non_negative(cfg: TrustConfig, *names: str) -> None:
    for name in names:
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {getattr(cfg, name)}")


def _registered(what: str, name: str, registry: dict) -> None:
    """A piece a config names by `name` must be registered (trust_fast.methods)."""
    if name not in registry:
        raise ValueError(f"{what} must be one of {tuple(registry)}, got {name!r}")


def _check_method(cfg: TrustConfig) -> None:
    from . import objectives  # imports torch: only when a config is checked
    from .methods import FORGET_OBJECTIVES, LOCALIZATIONS  # the registered pieces (their modules import torch)

    _registered("forget objective", cfg.forget_objective, FORGET_OBJECTIVES)
    _registered("localization", cfg.localization, LOCALIZATIONS)
    objectives.check(cfg.retain_objective)
    _require_at_least_one(cfg, "steps", "batch_size", "retain_batch_size")
    _require_fraction(cfg, "retain_neighbors")
    _require_fraction(cfg, "partial_fraction")
    _require_finite_non_negative(cfg, "alpha", "eta")
    if not 0 <= cfg.seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {cfg.seed}")


def _check_localization(cfg: TrustConfig) -> None:
    _require_at_least_one(cfg, "loc_interval", "min_row_updates")
    if not math.isfinite(cfg.xi):
        raise ValueError(f"xi must be a finite number, got {cfg.xi}")
    if cfg.max_fraction is not None and not 0.0 < cfg.max_fraction <= 1.0:
        raise ValueError(f"max_fraction must be in (0, 1], got {cfg.max_fraction}")
    if not 0.0 < cfg.mask_fraction <= 1.0:
        raise ValueError(f"mask_fraction must be in (0, 1], got {cfg.mask_fraction}")
    if cfg.targets is not None and (not cfg.targets or not all(t.strip() for t in cfg.targets)):
        raise ValueError(f"targets must be None or non-empty glob patterns, got {tuple(cfg.targets)!r}")


def _check_hessian(cfg: TrustConfig) -> None:
    _require_at_least_one(cfg, "hvp_interval", "diag_interval", "diag_samples")
    _require_finite_non_negative(cfg, "lam")
    if not (math.isfinite(cfg.hessian_fd_eps) and cfg.hessian_fd_eps > 0):
        raise ValueError(f"hessian_fd_eps must be a finite number > 0, got {cfg.hessian_fd_eps}")
    if cfg.hessian != "none" and cfg.retain_objective == "none":
        raise ValueError("a Hessian regularizer needs a retain objective (retain_objective='none')")


def _check_optimizer(cfg: TrustConfig) -> None:
    _require_finite_non_negative(cfg, "lr", "weight_decay")
    if not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise ValueError(f"betas must be in [0, 1), got {tuple(cfg.betas)}")
    if not (math.isfinite(cfg.eps) and cfg.eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {cfg.eps}")


def _check_adversary(cfg: TrustConfig) -> None:
    _require_at_least_one(cfg, "adv_steps", "adv_interval", "adv_population")
    _require_fraction(cfg, "adv_fraction", "adv_retain_fraction")
    _require_finite_non_negative(cfg, "adv_lr")
    if cfg.adv_prefix is not None and cfg.adv_prefix < 0:
        raise ValueError(f"adv_prefix must be >= 0, got {cfg.adv_prefix}")
    if cfg.adv_mode == "tokens" and cfg.adv_retain_fraction > 0:
        raise ValueError("adv_retain_fraction needs adv_mode='prefix' (token offsets belong to the forget prompts)")
    if cfg.adv_mode == "tokens" and cfg.adv_population > 1:
        raise ValueError("adv_population > 1 needs adv_mode='prefix' (token offsets all start at the prompts "
                         "themselves, so a population would be copies)")


def _check_data_free_cache(cfg: TrustConfig) -> None:
    _require_at_least_one(cfg, "x0_per_prompt", "x0_steps")
    if cfg.x0_retain_per_prompt is not None and cfg.x0_retain_per_prompt < 1:
        raise ValueError(f"x0_retain_per_prompt must be None or an int >= 1, got {cfg.x0_retain_per_prompt!r}")
    if cfg.x0_guidance is not None and not (math.isfinite(cfg.x0_guidance) and cfg.x0_guidance >= 0):
        raise ValueError(f"x0_guidance must be None or a finite number >= 0, got {cfg.x0_guidance}")


def _check_performance(cfg: TrustConfig) -> None:
    if cfg.hessian_micro_batch < 0:
        raise ValueError(f"hessian_micro_batch must be an int >= 0, got {cfg.hessian_micro_batch!r}")
    if cfg.compile_unet == "":
        raise ValueError(f"compile_unet must be a bool or a torch.compile backend name, got {cfg.compile_unet!r}")
    if cfg.compile_unet and cfg.compile_unet not in COMPILE_BACKENDS:
        backend = "inductor" if cfg.compile_unet is True else cfg.compile_unet
        raise ValueError(f"compile_unet={backend!r} is refused: with inductor the compiled denoiser's weight "
                         "gradients are wrong here (a tiny SD UNet: the same loss, zero gradients for its mid "
                         f"block); the backends checked to match eager are {', '.join(COMPILE_BACKENDS)}")


# group -> its value checks (choices are checked before them, from the fields' metadata)
_GROUP_CHECKS = {"method": _check_method, "localization": _check_localization, "hessian": _check_hessian,
                 "optimizer": _check_optimizer, "adversary": _check_adversary,
                 "data-free cache": _check_data_free_cache, "performance": _check_performance}


__all__ = ["TrustConfig", "effective_fields", "PREDATED_FIELDS", "X0_SOURCES", "ADV_PREFIX_AUTO",
           "COMPILE_BACKENDS", "GROUPS"]
