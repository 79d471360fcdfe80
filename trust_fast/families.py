"""Model families: everything the engine needs to know about a pipeline, behind one interface.

The engine (:class:`trust_fast.TrustUnlearner`) never looks at a pipeline's class. It asks the
pipeline's family for

- ``encode(prompts)``: the conditioning of each prompt as one tensor (N, L, D) on the denoiser's
  device and dtype. Everything the engine does with conditionings (index, concatenate, repeat) is
  done on that tensor, so a family with extra conditions packs them into it;
- ``uncond()``: the conditioning classifier-free guidance uses for "no prompt";
- ``denoiser_inputs(noisy, t, cond)``: the keyword arguments of the denoiser call (sample,
  timestep and the conditioning unpacked);
- ``default_targets``: the module patterns TRUST edits by default;
- ``cross_attention_targets``: the modules where the prompt reaches the image (what ESD-x trains);
  a config names either set as ``"@default"`` / ``"@cross_attention"`` (:meth:`Family.expand_targets`);
- ``denoiser_name``: the pipeline component that is the denoiser (``"unet"`` or ``"transformer"``),
  the only one unlearning edits;
- ``prediction_type``: what the denoiser predicts: "epsilon", "v_prediction" or "sample" (from the
  scheduler's config), or "flow" (flow matching: x_t = (1 - s) x0 + s noise with s = t / T, the
  velocity noise - x0 as target);
- ``sampler()``: a fresh scheduler of the pipeline's kind for sampling the data-free images;
- ``prompt_encoders()``, ``tokenize(prompts)`` and ``encode_ids(ids)``: the text encoders a prompt
  passes through (tokenizer, encoder, token count), its token ids for each, and the conditioning
  computed from those ids with gradients, so that :mod:`trust_fast.softprompt` can put free token
  embeddings into every encoder (the adversary, the soft-prompt, embedding and inversion attacks);
- ``pipeline_embeds(cond)``: a packed conditioning as the pipeline's ``__call__`` takes it
  (``prompt_embeds``, and ``pooled_prompt_embeds`` where the family has one).

Families:

``sd``    Stable Diffusion 1.x and 2.x (epsilon or v-prediction, any scheduler) and every pipeline
          with the same parts: a ``UNet2DConditionModel`` without added conditions, one CLIP text
          encoder and tokenizer (the built-in ``ShapesPipeline`` is one, without a VAE).
``sdxl``  Stable Diffusion XL: two text encoders whose penultimate hidden states are concatenated,
          the second one's pooled projection and the micro-conditioning time ids as the UNet's
          added conditions. The pooled embedding is packed into the conditioning tensor as extra
          rows after the tokens (zero-padded to D); the time ids are the same for every image
          (original = target size = the UNet's sample size in pixels, no crop) and are built in
          ``denoiser_inputs``.
``sd3``   Stable Diffusion 3 (MMDiT, ``SD3Transformer2DModel``): two CLIP encoders (penultimate
          states concatenated, zero-padded to the joint width) followed by T5's states (zeros when
          the pipeline has no third encoder, as diffusers does), the two pooled embeddings as
          ``pooled_projections`` (packed like SDXL's), flow matching. Default targets: the image
          queries and the text stream's query/key/value projections of every joint attention (where
          the prompt reaches the image: the MMDiT counterpart of a UNet's cross-attention q/k/v)
          and the image stream's feed-forward layers (the counterpart of the UNet's ff layers).

Anything else is refused up front with one line naming the class and the supported families.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
from torch import Tensor

from .localize import DEFAULT_TARGETS as UNET_TARGETS  # cross-attention q/k/v and the feed-forward layers

SUPPORTED = "StableDiffusionPipeline (1.x, 2.x), StableDiffusionXLPipeline, StableDiffusion3Pipeline, ShapesPipeline"
# the pipeline classes a model directory may name (model_index.json's _class_name): others with the same
# parts (img2img, inpainting) sample differently, so a directory of one is refused before diffusers loads it
SUPPORTED_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline",
                     "ShapesPipeline")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weights torch.load would unpickle


class UnsupportedPipeline(ValueError):
    """The pipeline belongs to no family trust_fast knows."""


class Family:
    """One model family's knowledge (see the module docstring). Subclasses set ``name`` and
    implement ``matches``, ``_encode`` and ``denoiser_kwargs``."""

    name = "?"
    default_targets: tuple[str, ...] = UNET_TARGETS
    cross_attention_targets: tuple[str, ...] = ("*attn2.*",)  # a UNet's cross-attention modules, all of them
    denoiser_name = "unet"

    def __init__(self, pipe):
        self.pipe = pipe
        self.denoiser = pipe.unet

    @staticmethod
    def matches(pipe) -> bool:
        raise NotImplementedError

    @property
    def prediction_type(self) -> str:
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

    def expand_targets(self, patterns: tuple[str, ...] | None) -> tuple[str, ...]:
        """Module glob patterns with the family's target sets spelled out: ``"@default"`` (what
        TRUST edits by default; also what None means) and ``"@cross_attention"``."""
        if patterns is None:
            return tuple(self.default_targets)
        sets = {"@default": self.default_targets, "@cross_attention": self.cross_attention_targets}
        out = []
        for p in patterns:
            if p.startswith("@") and p not in sets:
                raise ValueError(f"unknown target set {p!r}; the sets are {', '.join(sorted(sets))}")
            out.extend(sets[p] if p in sets else (p,))
        return tuple(out)

    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the denoiser denoises."""
        c = self.denoiser.config
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        return c.in_channels, size, size

    def prompt_encoders(self) -> list[tuple]:
        """(tokenizer, text encoder, token count) of every encoder a prompt passes through, in order."""
        tok, te = self.pipe.tokenizer, self.pipe.text_encoder
        return [(tok, te, tok.model_max_length)]

    def tokenize(self, prompts: list[str]) -> list[Tensor]:
        """The prompts' token ids (N, L) for each of :meth:`prompt_encoders`, on that encoder's device."""
        return [tok(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt")
                .input_ids.to(te.device) for tok, te, n in self.prompt_encoders()]

    def encode_ids(self, ids: list[Tensor]) -> Tensor:
        """Conditioning (N, L, D) from the token ids of each encoder (:meth:`tokenize`), with
        gradients through the encoders, on the denoiser's device and dtype."""
        return self._encode_ids(ids).to(self.denoiser.device, self.denoiser.dtype)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        """Conditioning (N, L, D) of the prompts, on the denoiser's device and dtype."""
        out = [self.encode_ids(self.tokenize(prompts[i:i + 256])) for i in range(0, len(prompts), 256)]
        if not out:
            return self.encode([""])[:0]
        return torch.cat(out)

    def uncond(self) -> Tensor:
        """The conditioning (1, L, D) of "no prompt"."""
        return self.encode([""])

    def _encode_ids(self, ids: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def pipeline_embeds(self, cond: Tensor) -> dict:
        """The keywords of the pipeline's ``__call__`` that stand for the prompts of a packed conditioning."""
        return {"prompt_embeds": cond}

    def denoiser_kwargs(self, cond: Tensor) -> dict:
        """The conditioning keywords of the denoiser call for a packed conditioning."""
        raise NotImplementedError

    def denoiser_inputs(self, noisy: Tensor, t: Tensor, cond: Tensor) -> dict:
        """Every keyword of one denoiser call: ``denoiser(**inputs).sample`` is its prediction."""
        return {"sample": noisy, "timestep": t, **self.denoiser_kwargs(cond)}

    def sampler(self):
        """A fresh scheduler that samples the data-free images: DDIM on the pipeline's noise schedule."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.pipe.scheduler.config)


class StableDiffusion(Family):
    """SD 1.x / 2.x and pipelines with the same parts (one CLIP text encoder, no added conditions)."""

    name = "sd"

    @staticmethod
    def matches(pipe) -> bool:
        unet = getattr(pipe, "unet", None)
        return (_class_name(unet) == "UNet2DConditionModel" and unet.config.get("addition_embed_type") is None
                and getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "tokenizer", None) is not None
                and getattr(pipe, "text_encoder_2", None) is None)

    def _encode_ids(self, ids: list[Tensor]) -> Tensor:
        return self.pipe.text_encoder(ids[0])[0]

    def denoiser_kwargs(self, cond: Tensor) -> dict:
        return {"encoder_hidden_states": cond}


class PackedPooled:
    """Pooled text embeddings packed as extra rows after the tokens of a conditioning (SDXL, SD3)."""

    def _pack_setup(self, width: int, pooled_dim: int) -> None:
        self.width, self.pooled_dim = width, pooled_dim
        self.pooled_rows = math.ceil(pooled_dim / width)

    def pack(self, hidden: Tensor, pooled: Tensor) -> Tensor:
        """(N, L, D) token states + (N, P) pooled -> (N, L + ceil(P / D), D)."""
        n = hidden.shape[0]
        pad = hidden.new_zeros(n, self.pooled_rows * self.width)
        pad[:, :self.pooled_dim] = pooled.to(hidden.dtype)
        return torch.cat([hidden, pad.view(n, self.pooled_rows, self.width)], 1)

    def unpack(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        n = cond.shape[0]
        hidden = cond[:, :cond.shape[1] - self.pooled_rows]
        pooled = cond[:, cond.shape[1] - self.pooled_rows:].reshape(n, -1)[:, :self.pooled_dim]
        return hidden, pooled

    def pipeline_embeds(self, cond: Tensor) -> dict:
        hidden, pooled = self.unpack(cond)
        return {"prompt_embeds": hidden, "pooled_prompt_embeds": pooled}


class StableDiffusionXL(PackedPooled, Family):
    """SDXL base: two text encoders, pooled text embedding and time ids as added conditions."""

    name = "sdxl"

    def __init__(self, pipe):
        super().__init__(pipe)
        self._pack_setup(pipe.unet.config.cross_attention_dim, pipe.text_encoder_2.config.projection_dim)
        scale = getattr(pipe, "vae_scale_factor", 8)  # pixels per latent, as the pipeline computes it
        _, h, w = self.sample_shape()
        self.time_ids = [h * scale, w * scale, 0, 0, h * scale, w * scale]
        expected = pipe.unet.add_embedding.linear_1.in_features
        got = pipe.unet.config.addition_time_embed_dim * len(self.time_ids) + self.pooled_dim
        if expected != got:
            raise UnsupportedPipeline(f"SDXL pipeline whose UNet expects added embeddings of {expected} values, "
                                      f"but its time ids and pooled text embedding give {got}")

    @staticmethod
    def matches(pipe) -> bool:
        unet = getattr(pipe, "unet", None)
        return (_class_name(unet) == "UNet2DConditionModel" and unet.config.get("addition_embed_type") == "text_time"
                and getattr(pipe, "text_encoder_2", None) is not None
                and getattr(pipe, "tokenizer_2", None) is not None)

    def prompt_encoders(self) -> list[tuple]:
        pairs = [(self.pipe.tokenizer, self.pipe.text_encoder), (self.pipe.tokenizer_2, self.pipe.text_encoder_2)]
        # SDXL refiner-style pipelines have only the second encoder
        return [(tok, te, tok.model_max_length) for tok, te in pairs if te is not None]

    def _encode_ids(self, ids: list[Tensor]) -> Tensor:
        hidden, pooled = [], None
        for (_, te, _), i in zip(self.prompt_encoders(), ids):
            out = te(i, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].to(self.denoiser.device))
            pooled = out[0].to(self.denoiser.device)  # the last encoder's pooled projection
        return self.pack(torch.cat(hidden, -1), pooled)

    def uncond(self) -> Tensor:
        if self.pipe.config.get("force_zeros_for_empty_prompt", True):
            return torch.zeros_like(self.encode([""]))  # what the pipeline does for an empty negative prompt
        return self.encode([""])

    def denoiser_kwargs(self, cond: Tensor) -> dict:
        hidden, pooled = self.unpack(cond)
        ids = torch.tensor(self.time_ids, device=cond.device, dtype=cond.dtype).expand(cond.shape[0], -1)
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}


class StableDiffusion3(PackedPooled, Family):
    """SD3 / SD3.5 (MMDiT): CLIP-L, CLIP-G and optional T5 states, pooled projections, flow matching."""

    name = "sd3"
    default_targets = ("*attn.to_q", "*attn.add_q_proj", "*attn.add_k_proj", "*attn.add_v_proj",
                       "*ff.net.0.proj", "*ff.net.2")
    # the joint attention, where text and image tokens attend to each other (the image-only attn2 of
    # SD3.5's dual-attention blocks is left out, as a UNet's self-attention attn1 is)
    cross_attention_targets = ("*.attn.*",)
    denoiser_name = "transformer"
    prediction_type = "flow"
    t5_tokens = 256  # StableDiffusion3Pipeline's default max_sequence_length

    def __init__(self, pipe):
        self.pipe = pipe
        self.denoiser = pipe.transformer
        c = pipe.transformer.config
        self._pack_setup(c.joint_attention_dim, c.pooled_projection_dim)

    @staticmethod
    def matches(pipe) -> bool:
        return (_class_name(getattr(pipe, "transformer", None)) == "SD3Transformer2DModel"
                and getattr(pipe, "text_encoder", None) is not None
                and getattr(pipe, "text_encoder_2", None) is not None)

    def prompt_encoders(self) -> list[tuple]:
        p = self.pipe
        out = [(p.tokenizer, p.text_encoder, p.tokenizer.model_max_length),
               (p.tokenizer_2, p.text_encoder_2, p.tokenizer_2.model_max_length)]
        if getattr(p, "text_encoder_3", None) is not None:
            out.append((p.tokenizer_3, p.text_encoder_3, self.t5_tokens))
        return out

    def _encode_ids(self, ids: list[Tensor]) -> Tensor:
        dev = self.denoiser.device
        hidden, pooled = [], []
        for (_, te, _), i in zip(self.prompt_encoders()[:2], ids):
            out = te(i, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].to(dev))
            pooled.append(out[0].to(dev))
        clip = torch.cat(hidden, -1)
        clip = torch.nn.functional.pad(clip, (0, self.width - clip.shape[-1]))
        if len(ids) < 3:  # what the pipeline does without T5: zeros in its place
            t5 = clip.new_zeros(clip.shape[0], self.t5_tokens, self.width)
        else:
            t5 = self.pipe.text_encoder_3(ids[2])[0].to(dev, clip.dtype)
        return self.pack(torch.cat([clip, t5], -2), torch.cat(pooled, -1))

    def sample_shape(self) -> tuple[int, int, int]:
        c = self.denoiser.config
        return c.in_channels, c.sample_size, c.sample_size

    def denoiser_kwargs(self, cond: Tensor) -> dict:
        hidden, pooled = self.unpack(cond)
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    def denoiser_inputs(self, noisy: Tensor, t: Tensor, cond: Tensor) -> dict:
        return {"hidden_states": noisy, "timestep": t, **self.denoiser_kwargs(cond)}

    def sampler(self):
        return type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)


def _class_name(module) -> str:
    """The denoiser's class name, seen through FSDP2's sharded subclass (trust_fast.fsdp)."""
    from .fsdp import plain_class

    return plain_class(module).__name__


FAMILIES: tuple[type[Family], ...] = (StableDiffusion, StableDiffusionXL, StableDiffusion3)


def family_for(pipe) -> Family:
    """The family of `pipe`; UnsupportedPipeline (a ValueError, one line) if it has none."""
    for fam in FAMILIES:
        if fam.matches(pipe):
            return fam(pipe)
    raise UnsupportedPipeline(f"{type(pipe).__name__} is not supported by trust_fast; supported: {SUPPORTED}")


# ----------------------------------------------------------------------------------- loading

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def stored_dtype(path: str, variant: str | None = None) -> torch.dtype | None:
    """The floating dtype of the denoiser's weights as saved in pipeline directory `path` (read from
    the safetensors header, nothing loaded), or None when there is no such file or it holds no
    floating tensor. ValueError, naming the file, when its header is not a safetensors header."""
    for sub in ("unet", "transformer"):
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
    from .world import model_path

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

        from .world.pipeline import ShapesPipeline  # noqa: F401  (registers the class with diffusers)

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
    if isinstance(name, str) and name not in SUPPORTED_CLASSES:
        raise UnsupportedPipeline(f"model {model!r} is a {name}, which trust_fast does not support; "
                                  f"supported: {SUPPORTED}")


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


__all__ = ["Family", "StableDiffusion", "StableDiffusionXL", "FAMILIES", "family_for", "UnsupportedPipeline",
           "UNET_TARGETS", "SUPPORTED", "SUPPORTED_CLASSES", "load_pipeline", "stored_dtype", "DTYPES"]
