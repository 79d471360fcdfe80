"""trust_fast: TRUST concept unlearning for text-to-image diffusion models.

Importing the package registers the built-in ShapesPipeline with diffusers, so
`diffusers.DiffusionPipeline.from_pretrained(dir)` loads shapes-world pipelines.
"""
from .world.pipeline import ShapesPipeline

__version__ = "0.1.0"
__all__ = ["ShapesPipeline", "__version__"]
