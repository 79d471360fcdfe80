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


def load_pipeline(model: str = "shapes", device: str | None = None):
    """Load a diffusers pipeline by built-in name or directory, offline. ValueError on a corrupt model."""
    import torch
    from diffusers import DiffusionPipeline

    from .pipeline import ShapesPipeline  # noqa: F401  (registers the class with diffusers)

    path = model_path(model)
    # loading bars on stderr would bury the CLI's one-line errors
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # its warnings list every missing tensor; we say it in one line
    try:
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    except Exception as e:  # diffusers raises many types for a broken directory
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"cannot load model {model!r}: {type(e).__name__}: {first}") from None
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            # diffusers leaves tensors that the weights file lacks on the meta device, without data
            empty = [k for k, t in [*component.named_parameters(), *component.named_buffers()] if t.is_meta]
            if empty:
                raise ValueError(f"cannot load model {model!r}: its {name} weights lack {len(empty)} tensors "
                                 f"(e.g. {empty[0]!r}); the weights file is incomplete")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


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
