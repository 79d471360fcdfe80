"""trust_fast: TRUST concept unlearning for text-to-image diffusion models.

Importing the package registers the built-in ShapesPipeline with diffusers, so
`diffusers.DiffusionPipeline.from_pretrained(dir)` loads shapes-world pipelines.

Public API: TrustConfig and TrustUnlearner (high level: `.step()`, `.run()`, `.save()`; low level
inside your own loop: `.forget_loss()`, `.retain_loss()`, `.update()`), `methods.config(name)` for
the SalUn and ESD baselines, and the concept helpers parse_concept / world_prompts / user_prompts.
"""
from . import methods
from .concepts import ConceptSpec, PromptSet, parse_concept, user_prompts, world_prompts
from .engine import TrustConfig, TrustUnlearner, encode_images, encode_prompts
from .world.pipeline import ShapesPipeline

__version__ = "0.1.0"
__all__ = ["ShapesPipeline", "TrustConfig", "TrustUnlearner", "methods", "encode_prompts", "encode_images",
           "ConceptSpec", "PromptSet", "parse_concept", "user_prompts", "world_prompts", "__version__"]
