"""What a method is made of, and the registries that make adding one a single file.

A method is a preset of :class:`~trust_fast.config.TrustConfig` plus the pieces it names there:
a forget objective (``forget_objective``: how a forget batch's regression target is made) and a
localization (``localization``: which weights step, with which optimizer). Each piece is a class
registered by name; the engine looks them up from the config, so it holds no branch on a method's
name. A method module registers its pieces and its preset:

    @register_forget_objective("mine")
    class MyObjective(ForgetObjective): ...

    register_method("mine", lambda **overrides: TrustConfig(forget_objective="mine").replace(**overrides))

Pieces receive the running :class:`~trust_fast.engine.TrustUnlearner` (its public components:
``denoiser``, ``data``, ``noising``, ``params``, ``opt_params``, ``config``); nothing here
imports the engine. Pieces import torch and the modules that use it when they run, so reading the
registries (``trust-fast --help`` lists ``METHODS``) loads no torch.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

FORGET_OBJECTIVES: dict[str, type["ForgetObjective"]] = {}
LOCALIZATIONS: dict[str, type["Localization"]] = {}
METHODS: dict[str, Callable] = {}


def _registrar(table: dict, name: str):
    def add(cls):
        table[name] = cls
        cls.name = name
        return cls
    return add


def register_forget_objective(name: str):
    """Class decorator: the forget objective of ``TrustConfig.forget_objective == name``."""
    return _registrar(FORGET_OBJECTIVES, name)


def register_localization(name: str):
    """Class decorator: the localization of ``TrustConfig.localization == name``."""
    return _registrar(LOCALIZATIONS, name)


def register_method(name: str, preset: Callable) -> None:
    """A method's preset: ``preset(**overrides) -> TrustConfig`` (the CLI's --method choices and
    the comparison scripts read this registry)."""
    METHODS[name] = preset


class ForgetObjective:
    """The regression target of a forget batch, made without gradient.

    ``needs_frozen``: the target comes from the frozen original model (the engine then keeps a
    copy of the original target weights); ``needs_anchor``: it needs the anchors' conditioning."""

    name = "?"
    needs_frozen = True
    needs_anchor = True

    def __init__(self, config):
        self.config = config

    def target(self, u, noisy: Tensor, t: Tensor, cond: Tensor, anchor_cond: Tensor | None) -> Tensor:
        raise NotImplementedError


class Localization:
    """Which rows of the target weights a step updates, and the optimizer that updates them.

    The base class is dense: every target weight steps under torch's AdamW. Subclasses select
    rows (TRUST) or mask gradients (SalUn). ``needs_forget_images``: :meth:`prepare` reads the
    forget pool of the data-free cache."""

    name = "?"
    needs_forget_images = False

    def __init__(self, u):
        import torch

        cfg = u.config
        self.config = cfg
        self.localizer = None
        self.optimizer = torch.optim.AdamW(u.opt_params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                           weight_decay=cfg.weight_decay)

    @property
    def sparse(self) -> bool:
        """Whether steps update selected rows (MaskedAdamW) rather than whole weights."""
        return self.localizer is not None

    def prepare(self, u) -> None:
        """Once the data-free images are cached (SalUn computes its mask here)."""

    def select(self, step: int, weight_grads: list[Tensor]) -> list[Tensor] | None:
        """The rows (one int64 tensor per target) this step updates; None: all of them."""
        return None

    def mask_gradients(self, opt_params: list[Tensor]) -> None:
        """Change the gradients in place before a dense optimizer step."""

    def state_bytes(self) -> int:
        return 0

    def report(self) -> dict:
        return {}

    # ------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {"localizer_rows": None, "mask": None}

    def check_state(self, f, state: dict, u) -> None:
        """The optimizer's saved state (an AdamW one: moments of the params' shapes, every param
        stepped once per applied step) and any mask, checked against this run."""
        applied = state["step_count"] - state["skipped_steps"]
        f.adam(state["optimizer"], "optimizer", u.opt_params)
        f.dense_steps(state["optimizer"], applied)
        mask = f.of_type(state.get("mask"), "mask", list, none=True)
        if mask is not None:
            f.tensors(mask, "SalUn mask", u.params)

    def load_state_dict(self, state: dict, u) -> None:
        pass


@register_localization("dense")
class Dense(Localization):
    """Every target weight steps (ESD)."""


def forget_objective(config) -> ForgetObjective:
    return FORGET_OBJECTIVES[config.forget_objective](config)


def localization(u) -> Localization:
    return LOCALIZATIONS[u.config.localization](u)
