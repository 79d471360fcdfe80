"""trust_fast: TRUST concept unlearning for text-to-image diffusion models.

Public API: TrustConfig and TrustUnlearner (high level: `.step()`, `.run()`, `.save()`; low level
inside your own loop: `.forget_loss()`, `.retain_loss()`, `.update()`), `methods.config(name)` for
the SalUn and ESD baselines, the concept helpers parse_concept / world_prompts / user_prompts, and
the drop-in pieces for a training loop of your own: MaskedAdamW (AdamW that updates only the rows
you select), row_saliency (per-row gradient saliency of a list of weights) and select_rows (the
rows whose saliency z-score exceeds a threshold).

Names are imported on first use, so `import trust_fast` (and `trust-fast --help`) stay fast.
`trust_fast.ShapesPipeline` (or loading a model through trust_fast) registers the built-in
pipeline class with diffusers, after which `diffusers.DiffusionPipeline.from_pretrained(dir)`
loads saved shapes-world pipelines.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "TrustConfig": ".config", "TrustUnlearner": ".engine", "encode_prompts": ".engine", "encode_images": ".engine",
    "ConceptSpec": ".concepts", "PromptSet": ".concepts", "parse_concept": ".concepts",
    "user_prompts": ".concepts", "world_prompts": ".concepts",
    "MaskedAdamW": ".optim",
    "row_saliency": ".ops", "select_rows": ".ops", "masked_adamw_": ".ops", "hutchinson_diag_": ".ops",
    "ShapesPipeline": ".world.pipeline",
    "load_pipeline": ".models",
}
_SUBMODULES = ("methods", "ops", "models", "families", "world", "evaluation", "concepts", "engine", "optim", "config")

__all__ = sorted([*_LAZY, "methods", "__version__"])


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'trust_fast' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
