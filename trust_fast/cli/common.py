"""What every `trust-fast` command shares: the one-line errors, the checks of numbers and devices
that run before any work, the claim of an output, and the model-loading and sampling options.

Nothing here imports torch at import time (`trust-fast --help` must not wait for it).
"""
from __future__ import annotations

import argparse


class UserError(ValueError):
    """A problem with the user's input; the CLI prints it as one line."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line like every other error (the usage block is what
    --help is for); subparsers inherit the class (add_subparsers' default parser_class)."""

    def error(self, message: str):
        self.exit(2, f"trust-fast: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        # a command refuses its own unknown arguments, so that the line points at its --help
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self._subparsers is None:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def one_line(e: BaseException) -> str:
    """An error as one line: OSErrors as 'what: file', anything else its first line."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename!r}" if e.filename else e.strerror
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def flag(name: str) -> str:
    """The command-line flag of an argument: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


# (argument, rule) for every number a command takes: one checker runs them all before any work
_AT_LEAST_ONE = ("n", "n_per_prompt", "steps", "softprompt_steps", "embedding_steps", "inversion_steps",
                 "diffusion_steps", "classifier_steps", "batch_size", "x0_per_prompt", "x0_retain_per_prompt",
                 "x0_steps", "loc_interval", "min_row_updates")
_AT_LEAST_ZERO = ("eval_every", "checkpoint_every", "adv_prefix")
_POSITIVE = ("lr", "max_minutes", "attack_lr")
_FINITE = ("guidance", "alpha", "lam")
# counts that size an allocation: beyond these a command would only exhaust memory (a traceback or an
# abort that leaves its staging behind), never finish
_AT_MOST = {"n": 10_000, "n_per_prompt": 10_000, "x0_per_prompt": 10_000, "x0_retain_per_prompt": 10_000,
            "batch_size": 65_536, "adv_prefix": 64, "hessian_micro_batch": 65_536}
SEED_LIMIT = 2**63  # torch generators take seeds in [0, 2**64); keep them in int64 for every backend


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse, in one line naming the flag, any number that would crash later or do nothing."""
    import math

    for name in dict.fromkeys(_AT_LEAST_ONE + _AT_LEAST_ZERO + _POSITIVE + _FINITE + ("seed",) + tuple(_AT_MOST)):
        value = getattr(args, name, None)
        if value is None:
            continue
        if not math.isfinite(value):
            raise UserError(f"{flag(name)} must be a finite number, got {value}")
        if name in _AT_LEAST_ONE and value < 1:
            raise UserError(f"{flag(name)} must be positive, got {value}")
        if name in _AT_LEAST_ZERO and value < 0:
            raise UserError(f"{flag(name)} must be >= 0, got {value}")
        if name in _POSITIVE and not value > 0:
            raise UserError(f"{flag(name)} must be positive, got {value}")
        if name == "seed" and not 0 <= value < SEED_LIMIT:
            raise UserError(f"--seed must be in [0, 2**63), got {value}")
        if name in _AT_MOST and value > _AT_MOST[name]:
            raise UserError(f"{flag(name)} must be at most {_AT_MOST[name]:,}, got {value:,}")
    if getattr(args, "guidance", None) is not None and args.guidance < 0:
        raise UserError(f"--guidance must be >= 0, got {args.guidance}")


def check_device(text: str | None) -> None:
    """Refuse, in one line, a --device torch cannot parse or this machine does not have (torch says
    so only mid-load, in a traceback). Backends torch has a module for (cuda, mps, xpu, ...) are
    asked for their device count; any other device type must take a tensor."""
    if text is None:
        return
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cpu":
        return
    if device.type == "meta":
        raise UserError(f"--device {text!r} holds shapes without data; sampling and unlearning need cpu or an "
                        "accelerator")
    backend = getattr(torch, device.type, None)
    if not hasattr(backend, "device_count"):
        try:
            torch.empty(0, device=device)
        except Exception as e:  # each backend fails its own way
            raise UserError(f"--device {text!r} is not usable here: {one_line(e)}") from None
        return
    count, kind = backend.device_count(), device.type.upper()
    if count == 0:
        raise UserError(f"--device {text!r}: no {kind} device is available (torch {torch.__version__} sees none)")
    if device.index is not None and device.index >= count:
        raise UserError(f"--device {text!r}: this machine has {count} {kind} device(s), "
                        f"{device.type}:0 to {device.type}:{count - 1}")


def claim(path: str, what: str, args, **kw):
    """The command's claim of an output (trust_fast.io.claim_output, honouring --overwrite)."""
    from ..io import claim_output

    return claim_output(path, what, overwrite=getattr(args, "overwrite", False), **kw)


def load_model(args, model: str):
    """A pipeline with the command's --dtype/--variant/--device (trust_fast.families.load_pipeline)."""
    from ..models import load_pipeline

    return load_pipeline(model, device=getattr(args, "device", None), dtype=getattr(args, "dtype", "auto"),
                         variant=getattr(args, "variant", None))


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--dtype, --variant and --device: how load_model loads a command's models."""
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="load the model in this dtype (default auto: the dtype its weights were saved in)")
    add_variant(p, "(outputs are saved the same way)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:1 or cpu (default: cuda if available)")


def add_variant(p: argparse.ArgumentParser, which: str) -> None:
    """--variant, its help ending with `which` (what it applies to)."""
    p.add_argument("--variant", default=None,
                   help=f"weights variant to load, e.g. fp16 for *.fp16.safetensors, {which}")


def add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier trust-fast output at --out (never anything else)")


def add_sampling(p: argparse.ArgumentParser) -> None:
    """--steps and --guidance of the commands that sample images."""
    from ..defaults import DEFAULT_GUIDANCE, DEFAULT_STEPS

    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help="sampling steps of the model's own scheduler (default %(default)s)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help="classifier-free guidance scale (default %(default)s; the shapes world wants low guidance)")


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="shapes", help="'shapes' (built-in) or a diffusers pipeline directory")


def add_concept(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concept", required=True, help="'A', 'A+B' (combination) or 'A|B' (conditional)")


def add_forget_prompts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--forget-prompts",
                   help="file of prompts showing the concept (one a line; required outside the world)")
