"""The built-in shapes world: vocabulary, renderer, models, and loading of the shipped weights."""
from __future__ import annotations

import os

from . import vocab
from .render import Batch, generate, render, save_grid

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
BUILTIN = {"shapes": os.path.join(ASSETS, "shapes")}


def model_path(model: str) -> str:
    """Resolve a model name ("shapes") or a local diffusers pipeline directory; ValueError if neither."""
    if model in BUILTIN:
        path = BUILTIN[model]
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ValueError(f"the built-in model {model!r} is missing from the installation ({path})")
        return path
    if not os.path.isdir(model):
        raise ValueError(f"model {model!r} is neither a built-in model ({', '.join(BUILTIN)}) nor a directory")
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        raise ValueError(f"model directory {model!r} has no model_index.json: not a diffusers pipeline")
    return model


def is_world_model(model: str) -> bool:
    """True for the built-in model and for pipelines derived from it (unlearned copies)."""
    import json

    path = model_path(model)
    try:
        with open(os.path.join(path, "model_index.json")) as f:
            return json.load(f).get("_class_name") == "ShapesPipeline"
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"cannot load model {model!r}: corrupt model_index.json ({e})") from None


def load_pipeline(model: str = "shapes", device: str | None = None, dtype: str = "auto",
                  variant: str | None = None):
    """Load a pipeline by built-in name or directory: :func:`trust_fast.models.load_pipeline`."""
    from ..models import load_pipeline as load

    return load(model, device, dtype, variant)


def load_classifier(device: str = "cpu"):
    """The shipped attribute classifier (eval mode)."""
    from safetensors.torch import load_file

    from .models import AttributeClassifier

    path = os.path.join(ASSETS, "classifier.safetensors")
    if not os.path.isfile(path):
        raise ValueError(f"the shapes-world classifier is missing from the installation ({path})")
    clf = AttributeClassifier()
    clf.load_state_dict(load_file(path))
    return clf.eval().to(device)


__all__ = ["vocab", "Batch", "generate", "render", "save_grid", "model_path", "load_pipeline",
           "load_classifier", "is_world_model", "BUILTIN"]
