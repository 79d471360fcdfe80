"""Loading a pipeline, offline and safely: :func:`load_pipeline` by built-in name or directory, with
every check that runs before diffusers reads a byte of weights (the pipeline class of
model_index.json against the registered families, pickled weights refused, component configs
bounded, the safetensors header of the denoiser read for its dtype), then the family check.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .base import UnsupportedPipeline
from .registry import denoiser_names, family_for, supported, supported_classes

# the pipeline classes a model directory may name (model_index.json's _class_name), as the built-in
# families registered them (trust_fast.models imports them first; the check asks the registry itself,
# so a family registered later counts too): others with the same parts (img2img, inpainting) sample
# differently, so a directory of one is refused before diffusers loads it
SUPPORTED_CLASSES: tuple[str, ...] = supported_classes()
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weights torch.load would unpickle

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def stored_dtype(path: str, variant: str | None = None) -> torch.dtype | None:
    """The floating dtype of the denoiser's weights as saved in pipeline directory `path` (read from
    the safetensors header, nothing loaded), or None when there is no such file or it holds no
    floating tensor. ValueError, naming the file, when its header is not a safetensors header."""
    for sub in denoiser_names():
        name = "diffusion_pytorch_model" + (f".{variant}" if variant else "") + ".safetensors"
        f = os.path.join(path, sub, name)
        if not os.path.isfile(f):
            continue
        names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        for k, v in _safetensors_header(f).items():
            if k != "__metadata__" and v.get("dtype") in names:
                return names[v["dtype"]]
    return None


def _safetensors_header(f: str) -> dict:
    """The header of safetensors file `f`: a JSON object of one object per tensor (and
    ``__metadata__``). ValueError naming the file when it is anything else, so that a broken file
    is one line, not a crash on the first entry."""
    import json

    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n < 100_000_000:
                raise ValueError(f"the safetensors header of {f!r} claims {n} bytes")
            header = json.loads(fh.read(n))
    except OSError as e:
        raise ValueError(f"cannot read the safetensors header of {f!r}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"the safetensors header of {f!r} is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError(f"the safetensors header of {f!r} is a JSON {type(header).__name__}, not an object "
                         "of tensor entries")
    bad = next((k for k, v in header.items() if not isinstance(v, dict)), None)
    if bad is not None:
        raise ValueError(f"the safetensors header of {f!r} has entry {bad!r} that is a JSON "
                         f"{type(header[bad]).__name__}, not an object")
    return header


def load_pipeline(model: str = "shapes", device: str | None = None, dtype: str = "auto",
                  variant: str | None = None):
    """Load a diffusers pipeline by built-in name ("shapes") or directory, offline, and check that
    trust_fast supports it. `dtype`: "auto" (the dtype the denoiser was saved in), "float32",
    "float16" or "bfloat16"; `variant`: the weights variant to load ("fp16" for
    ``diffusion_pytorch_model.fp16.safetensors``). The pipeline remembers its variant
    (``pipe.trust_fast_variant``) so that saving it writes the same files. ValueError, one line,
    on a broken or unsupported model; pickled weights (.bin) are refused, never unpickled."""
    from ..world import model_path  # (lazily: the world needs nothing from here at import time)

    path = model_path(model)
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    index = _model_index(path)
    _check_pipeline_class(model, index)
    _refuse_pickles(model, path, index)
    _check_component_configs(model, path, index)
    try:
        saved = stored_dtype(path, variant)
    except ValueError as e:
        raise ValueError(f"cannot load model {model!r}: {e}") from None
    torch_dtype = DTYPES[dtype] if dtype != "auto" else (saved or torch.float32)
    with _quiet_loading():
        from diffusers import DiffusionPipeline

        from ..world.pipeline import ShapesPipeline  # noqa: F401  (registers the class with diffusers)

        try:
            pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, variant=variant,
                                                     use_safetensors=True, **{_dtype_keyword(): torch_dtype},
                                                     **{k: None for k in _absent_components(index)})
        except Exception as e:  # diffusers raises many types for a broken directory
            first = (str(e).strip().splitlines() or [""])[0]
            hint = "" if variant else _variant_hint(path)
            raise ValueError(f"cannot load model {model!r}: {type(e).__name__}: {first}{hint}") from None
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                # diffusers leaves tensors that the weights file lacks on the meta device, without data
                empty = [k for k, t in [*component.named_parameters(), *component.named_buffers()] if t.is_meta]
                if empty:
                    raise ValueError(f"cannot load model {model!r}: its {name} weights lack {len(empty)} tensors "
                                     f"(e.g. {empty[0]!r}); the weights file is incomplete")
        family_for(pipe)
        pipe.set_progress_bar_config(disable=True)
        pipe.trust_fast_variant = variant
        return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@contextlib.contextmanager
def _quiet_loading():
    """diffusers' and transformers' log lines (missing files, every missing tensor, a float16 pipeline
    on the CPU), python warnings and loading bars, all off while a pipeline loads: they would bury
    the CLI's one-line error, and whatever goes wrong is raised as that line. The libraries'
    verbosity is restored afterwards."""
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import diffusers
        import transformers

        libs = [diffusers.utils.logging, transformers.utils.logging]
        before = [lib.get_verbosity() for lib in libs]
        for lib in libs:
            lib.disable_progress_bar()
            lib.set_verbosity(logging.CRITICAL + 1)  # diffusers logs a missing weights file as an error
        try:
            yield
        finally:
            for lib, level in zip(libs, before):
                lib.set_verbosity(level)


def _model_index(path: str) -> dict:
    """model_index.json of pipeline directory `path`, or {} when it cannot be read (diffusers then
    says why, in the loader's one line)."""
    import json

    try:
        with open(os.path.join(path, "model_index.json")) as f:
            index = json.load(f)
    except (OSError, ValueError, RecursionError):
        return {}
    return index if isinstance(index, dict) else {}


def _check_pipeline_class(model: str, index: dict) -> None:
    """UnsupportedPipeline, one line, for a directory of a pipeline class trust_fast does not take."""
    name = index.get("_class_name")
    if isinstance(name, str) and name not in supported_classes():
        raise UnsupportedPipeline(f"model {model!r} is a {name}, which trust_fast does not support; "
                                  f"supported: {supported()}")


def _refuse_pickles(model: str, path: str, index: dict) -> None:
    """A component saved only as a pickle (``pytorch_model.bin`` and the like) is refused by name:
    unpickling a file can run any code in it."""
    for name in (k for k in index if not k.startswith("_")):
        folder = os.path.join(path, name)
        files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        if pickles and not any(f.endswith(".safetensors") for f in files):
            raise ValueError(f"cannot load model {model!r}: its {name} weights are a pickle file "
                             f"({os.path.join(folder, pickles[0])!r}), which trust_fast never loads (unpickling can "
                             "run code); save them as safetensors")


# no config of a supported family holds a count or size above this (vocabularies are ~50k, timesteps
# 1000); a larger one would only make diffusers allocate without bound before any weight is read
CONFIG_INT_LIMIT = 10**6


# sizes diffusers and transformers allocate by before any weight is read, with the range any model
# of the supported families has (latent sample size, tokens per prompt)
_SIZES = {"sample_size": (1, 4096), "model_max_length": (1, 4096), "num_train_timesteps": (1, 100_000)}


def _check_component_configs(model: str, path: str, index: dict) -> None:
    """Each component's config (config.json, scheduler_config.json) is a JSON object whose integers
    are below CONFIG_INT_LIMIT: ValueError, one line naming the file and the key, otherwise. A
    scheduler with num_train_timesteps 1e12 made diffusers allocate 23 GB before failing."""
    import json

    for name in (k for k in index if not k.startswith("_")):
        for file in ("config.json", "scheduler_config.json", "tokenizer_config.json"):
            f = os.path.join(path, name, file)
            if not os.path.isfile(f):
                continue
            try:
                with open(f) as fh:
                    config = json.load(fh)
            except (OSError, ValueError, RecursionError) as e:
                raise ValueError(f"cannot load model {model!r}: {f!r} is not readable JSON "
                                 f"({type(e).__name__})") from None
            if not isinstance(config, dict):
                raise ValueError(f"cannot load model {model!r}: {f!r} is a JSON {type(config).__name__}, not an object")
            for key, value in config.items():
                values = value if isinstance(value, list) else [value]
                big = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and abs(v) > CONFIG_INT_LIMIT]
                if big:
                    raise ValueError(f"cannot load model {model!r}: {key} = {big[0]} in {f!r} is beyond any model "
                                     f"trust_fast supports (at most {CONFIG_INT_LIMIT:,})")
                low, high = _SIZES.get(key, (None, None))
                bad = [v for v in values if low is not None and not (isinstance(v, int) and low <= v <= high)]
                if bad:
                    raise ValueError(f"cannot load model {model!r}: {key} = {bad[0]!r} in {f!r} is not a size in "
                                     f"[{low}, {high}]")


def _dtype_keyword() -> str:
    """from_pretrained's dtype keyword: ``dtype`` in diffusers releases that deprecated
    ``torch_dtype`` (they warn on it), ``torch_dtype`` before (they do not know ``dtype``)."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def _absent_components(index: dict) -> list[str]:
    """Components a pipeline was saved without ([null, null] in model_index.json, e.g. SD3 without
    its T5 encoder), to be passed as None: diffusers refuses to load such a pipeline otherwise."""
    return [k for k, v in index.items() if not k.startswith("_") and v == [None, None]]


def _variant_hint(path: str) -> str:
    import glob

    found = sorted({os.path.basename(f).split(".")[-2] for f in glob.glob(os.path.join(path, "*", "*.*.safetensors"))})
    return f" (its weights are saved as variant {', '.join(found)}: pass --variant)" if found else ""


__all__ = ["load_pipeline", "stored_dtype", "DTYPES", "SUPPORTED_CLASSES", "PICKLE_SUFFIXES", "CONFIG_INT_LIMIT"]
