"""Training of the shapes world's models: the attribute classifier and the text-to-image pipeline.

`trust-fast world train` runs both and writes the shipped assets. Seeded; settings and
wall-clock are recorded next to the weights (training.json). Not run in CI (the weights ship),
but tests run a few steps of each to keep this code working.
"""
from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .models import AttributeClassifier, scheduler_config, text_config, unet_config
from ..io import claim_output, save_file_atomic, write_json_atomic, write_pretrained
from .render import generate, random_captions


@dataclass
class ClassifierTrainConfig:
    steps: int = 700
    batch: int = 128
    lr: float = 3e-3
    seed: int = 0


@dataclass
class DiffusionTrainConfig:
    steps: int = 4500
    max_minutes: float = 40.0  # stop early (and save) when the wall-clock budget is spent
    threads: int = 1  # one thread: it keeps its speed when the machine's 2 cores are shared
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    seed: int = 0


def train_classifier(cfg: ClassifierTrainConfig, progress: bool = True) -> tuple[AttributeClassifier, dict]:
    torch.manual_seed(cfg.seed)
    model = AttributeClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    t0 = time.perf_counter()
    for step in tqdm(range(cfg.steps), desc="classifier", disable=not progress):
        b = generate(cfg.batch, seed=1_000_000 + cfg.seed * 100_000 + step)
        logits = model(b.images)
        loss = sum(F.cross_entropy(logits[a], b.labels[a]) for a in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model, {"config": asdict(cfg), "seconds": time.perf_counter() - t0, "final_loss": loss.item()}


def build_untrained_pipeline(seed: int = 0):
    """A ShapesPipeline with freshly initialised UNet and text encoder and the world's tokenizer."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .pipeline import ShapesPipeline
    from .tokenizer import write_tokenizer

    with tempfile.TemporaryDirectory() as d:
        write_tokenizer(d)
        tok = CLIPTokenizer.from_pretrained(d)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config())
    te = CLIPTextModel(CLIPTextConfig(**text_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.model_max_length)))
    return ShapesPipeline(unet=unet, text_encoder=te, tokenizer=tok, scheduler=DDIMScheduler(**scheduler_config()))


def train_diffusion(cfg: DiffusionTrainConfig, pipe=None, progress: bool = True, checkpoint: str | None = None):
    """Train UNet and text encoder jointly (DDPM epsilon loss, cosine schedule). Returns the EMA pipeline and a log."""
    pipe = pipe or build_untrained_pipeline(cfg.seed)
    unet, te, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    unet.train()
    te.train()
    params = list(unet.parameters()) + list(te.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

    def lr_at(s: int) -> float:
        if s < cfg.warmup:
            return cfg.lr * (s + 1) / cfg.warmup
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - cfg.warmup) / max(1, cfg.steps - cfg.warmup))))

    abar = pipe.scheduler.alphas_cumprod.float()
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="diffusion", disable=not progress)
    step = 0
    for step in bar:
        b = generate(cfg.batch, seed=cfg.seed * 10_000_000 + step)
        caps = random_captions(b, g)
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        emb = te(ids)[0]
        t = torch.randint(0, abar.numel(), (cfg.batch,), generator=g)
        noise = torch.randn(b.images.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * b.images + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=emb).sample, noise)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - d)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if checkpoint and step % 500 == 499:
            _save_ema(pipe, params, ema, checkpoint)
        if (time.perf_counter() - t0) / 60 > cfg.max_minutes:
            break
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    unet.eval()
    te.eval()
    log = {"config": asdict(cfg), "steps_done": step + 1, "seconds": time.perf_counter() - t0,
           "loss_last_200": sum(losses[-200:]) / max(1, len(losses[-200:]))}
    return pipe, log


def _save_ema(pipe, params, ema, path: str) -> None:
    snap = copy.deepcopy(pipe)
    snap_params = list(snap.unet.parameters()) + list(snap.text_encoder.parameters())
    with torch.no_grad():
        for p, e in zip(snap_params, ema):
            p.copy_(e)
    write_pretrained(snap, path)  # a snapshot inside main_train's claimed output


def main_train(what: str = "all", out: str | None = None, diffusion_steps: int | None = None,
               max_minutes: float | None = None, classifier_steps: int | None = None, seed: int = 0,
               overwrite: bool = False) -> dict:
    """Train the classifier and/or the diffusion pipeline and write them into the new directory
    `out` (all or nothing, see trust_fast.io.claim_output): classifier.safetensors,
    classifier_training.json and shapes/ (the pipeline, with training.json). The shipped assets are
    an input, never an output: copy what you train over them by hand if you mean to."""
    from . import BUILTIN

    if not out:
        raise ValueError("world train needs an output directory (--out); the shipped weights are never overwritten")
    for name, value in (("diffusion_steps", diffusion_steps), ("classifier_steps", classifier_steps)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"max_minutes must be positive, got {max_minutes}")
    record: dict = {"torch": torch.__version__}
    with claim_output(out, "--out", overwrite=overwrite, inputs=[("built-in model directory", BUILTIN["shapes"])]) as claimed:
        if what in ("all", "classifier"):
            ccfg = ClassifierTrainConfig(seed=seed, **({"steps": classifier_steps} if classifier_steps else {}))
            clf, log = train_classifier(ccfg)
            save_file_atomic(clf.state_dict(), os.path.join(claimed.path, "classifier.safetensors"))
            write_json_atomic(log, os.path.join(claimed.path, "classifier_training.json"))
            record["classifier"] = log
        if what in ("all", "diffusion"):
            dcfg = DiffusionTrainConfig(seed=seed)
            if diffusion_steps is not None:
                dcfg.steps = diffusion_steps
            if max_minutes is not None:
                dcfg.max_minutes = max_minutes
            torch.set_num_threads(dcfg.threads)
            target = os.path.join(claimed.path, "shapes")
            pipe, log = train_diffusion(dcfg, checkpoint=target + ".ckpt")
            write_pretrained(pipe, target)
            shutil.rmtree(target + ".ckpt", ignore_errors=True)
            log["torch"] = torch.__version__
            write_json_atomic(log, os.path.join(target, "training.json"))
            record["diffusion"] = log
    return record
