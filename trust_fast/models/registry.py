"""Which family a pipeline belongs to: the registered families, asked in order of registration.

    @register_family
    class MyFamily(Family):
        name = "mine"
        pipeline_classes = ("MyPipeline",)      # model_index.json classes the loader takes
        supported = ("MyPipeline",)             # how the refusal message names it
        @staticmethod
        def matches(pipe): ...

:func:`family_for` returns the adapter of the first family whose ``matches(pipe)`` is true, and
raises :class:`UnsupportedPipeline` (one line naming the class and every supported pipeline)
otherwise. The built-in families (sd, sdxl, sd3, flux) register when :mod:`trust_fast.models` is
imported.
"""
from __future__ import annotations

from .base import Family, UnsupportedPipeline

_FAMILIES: list[type[Family]] = []


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: add a family to the registry (after those registered before it; a family
    registered twice keeps its first place). Returns the class."""
    if not (isinstance(cls, type) and issubclass(cls, Family)):
        raise TypeError(f"register_family takes a Family subclass, got {cls!r}")
    if cls not in _FAMILIES:
        _FAMILIES.append(cls)
    return cls


def registered() -> tuple[type[Family], ...]:
    """The registered families, in the order family_for asks them."""
    return tuple(_FAMILIES)


def supported() -> str:
    """The supported pipelines as the refusal message names them."""
    return ", ".join(label for fam in _FAMILIES for label in fam.supported)


def supported_classes() -> tuple[str, ...]:
    """The pipeline classes (model_index.json's ``_class_name``) the loader takes."""
    return tuple(dict.fromkeys(c for fam in _FAMILIES for c in fam.pipeline_classes))


def denoiser_names() -> tuple[str, ...]:
    """The component names of the registered families' denoisers (``unet``, ``transformer``)."""
    return tuple(dict.fromkeys(fam.denoiser_name for fam in _FAMILIES))


def family_for(pipe) -> Family:
    """The family of `pipe`; UnsupportedPipeline (a ValueError, one line) if it has none."""
    for fam in _FAMILIES:
        if fam.matches(pipe):
            return fam(pipe)
    raise UnsupportedPipeline(f"{type(pipe).__name__} is not supported by trust_fast; supported: {supported()}")


__all__ = ["register_family", "registered", "family_for", "supported", "supported_classes", "denoiser_names"]
