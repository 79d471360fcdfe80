"""End-to-end unlearning steps at the scale users run: Stable Diffusion 1.5 (or SDXL) built from its
configs at random init (nothing downloaded), every method on the same prompts, batches and seeds.

    python benchmarks/e2e.py --arch sd15 --latent 32 --batch 2 2 --steps 2 --methods trust trust-naive esd
    python benchmarks/e2e.py --tiny --steps 1            # seconds: what CI runs

Methods: ``trust`` (TrustUnlearner, defaults), ``trust-naive`` (the same TRUST step written the way
a competent user would without this library: float32, a deep copy of the UNet as the frozen model
called once per target, eager per-layer saliency and z-scores in Python, dense AdamW with the
gradient multiplied by the row mask, the Hutchinson diagonal and its penalty in plain torch, math
attention), ``salun`` and ``esd`` (the engine's configs). Each method runs in a fresh process, so
that the peak memory is its own: the CPU figure is the process's RSS high-water mark, the CUDA
figure ``torch.cuda.max_memory_allocated``. Times are medians over ``--steps`` steps after one
warm-up step. It prints a Markdown table with ratios against ``trust`` and, with ``--out``,
writes the rows as CSV; ``--benchmarks-md`` appends the table to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

METHODS = ("trust", "trust-naive", "salun", "esd")
FORGET = ["a photo of a red car", "a red car on a street", "a painting of a red car", "a red car at night"]
RETAIN = ["a photo of a blue car", "a photo of a dog", "a painting of a house", "a city street at night"]
PHASES = ("forward", "forget_backward", "localize", "retain_backward_hessian", "optimizer")


# ----------------------------------------------------------------------------- models from configs

def _tokenizer(max_length: int):
    from transformers import CLIPTokenizer

    from trust_fast.world.tokenizer import write_tokenizer

    with tempfile.TemporaryDirectory() as d:
        write_tokenizer(d)
        return CLIPTokenizer.from_pretrained(d, model_max_length=max_length)


def build_pipeline(arch: str, latent: int, tiny: bool = False):
    """A pipeline of `arch` ("sd15" or "sdxl") at random init from its configs; `tiny` shrinks
    every width and depth (for tests) but keeps the structure."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sd15_shapes import SD15_UNET_CONFIG

    torch.manual_seed(0)
    tok = _tokenizer(16 if tiny else 77)
    vocab = len(tok) if tiny else 49408

    def text(hidden, layers, heads, inter, projection=None):
        kw = dict(projection_dim=projection) if projection else {}
        cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, max_position_embeddings=tok.model_max_length,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id, hidden_act="quick_gelu", **kw)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)

    vae_channels = (16, 32) if tiny else (128, 256, 512, 512)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels,
                        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
                        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), layers_per_block=1 if tiny else 2,
                        norm_num_groups=8 if tiny else 32, sample_size=latent * 2 ** (len(vae_channels) - 1),
                        scaling_factor=0.18215 if arch == "sd15" else 0.13025)
    if arch == "sd15":
        if tiny:
            unet = UNet2DConditionModel(
                sample_size=latent, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
                norm_num_groups=8)
            te = text(32, 2, 4, 64)
        else:
            unet = UNet2DConditionModel(**dict(SD15_UNET_CONFIG, sample_size=latent))
            te = text(768, 12, 12, 3072)  # CLIP ViT-L/14's text tower
        sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif arch == "sdxl":
        if tiny:
            te, te2 = text(16, 2, 4, 32), text(32, 2, 4, 64, projection=24)
            unet = UNet2DConditionModel(
                sample_size=latent, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=48, attention_head_dim=4,
                norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=4,
                projection_class_embeddings_input_dim=6 * 4 + 24, use_linear_projection=True)
        else:
            te, te2 = text(768, 12, 12, 3072), text(1280, 32, 20, 5120, projection=1280)  # CLIP-L, OpenCLIP bigG
            unet = UNet2DConditionModel(
                sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                       "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816, use_linear_projection=True)
        sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, steps_offset=1, timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                         unet=unet, scheduler=sched)
    else:
        raise ValueError(f"unknown arch {arch!r} (sd15, sdxl)")
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- the naive TRUST step

class NaiveTrust:
    """TRUST's step written without trust_fast's machinery (see the module docstring). It borrows
    from `u` (a TrustUnlearner on the same pipeline and seed) only the data: the encoded prompts,
    the data-free pool and the batches drawn from it, so both see identical inputs."""

    def __init__(self, u):
        import torch

        self.u, self.cfg = u, u.config
        u.prepare()  # the data-free pool (shared machinery, timed as x0_pool_s)
        self.unet = u.unet
        self.frozen = copy.deepcopy(u.unet).requires_grad_(False)
        self.params = u.params
        self.weights = [t.weight for t in u.targets]
        self.theta0 = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.params, lr=self.cfg.lr, betas=self.cfg.betas, eps=self.cfg.eps,
                                     weight_decay=self.cfg.weight_decay)
        self.diag = [torch.zeros_like(p) for p in self.params]
        self.count = 0
        self.step_count = 0
        self.rows: list = []

    def _select(self, g_weights):
        """Per layer: mean |g| per row, z-scored over the layer's rows (population std, float64),
        rows above xi (at most max_fraction of them, highest first)."""
        import torch

        rows = []
        for g in g_weights:
            s = g.abs().flatten(1).mean(1).double()
            z = (s - s.mean()) / s.std(unbiased=False)
            r = torch.nonzero(z > self.cfg.xi).flatten()
            if self.cfg.max_fraction is not None:
                cap = int(self.cfg.max_fraction * s.numel())
                r = r[torch.argsort(s[r], descending=True)[:cap]].sort().values
            rows.append(r)
        return rows

    def step(self) -> dict:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        cfg, u = self.cfg, self.u
        sync = torch.cuda.synchronize if u.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        fb, rb = u.forget_batch(cfg.batch_size), u.retain_batch(cfg.retain_batch_size)
        kw = u.family.denoiser_kwargs
        with torch.no_grad():  # the frozen copy, once per target
            f_target = self.frozen(fb.noisy, fb.t, **kw(fb.anchor)).sample
            r_target = self.frozen(rb.noisy, rb.t, **kw(rb.cond)).sample
        with sdpa_kernel(SDPBackend.MATH):
            loss_f = torch.nn.functional.mse_loss(self.unet(fb.noisy, fb.t, **kw(fb.cond)).sample.float(),
                                                  f_target.float())
        sync()
        t1 = time.perf_counter()
        g_f = torch.autograd.grad(loss_f, self.params, allow_unused=True)
        g_f = [g if g is not None else torch.zeros_like(p) for g, p in zip(g_f, self.params)]
        sync()
        t2 = time.perf_counter()
        w_pos = {id(p): i for i, p in enumerate(self.params)}
        rows = self._select([g_f[w_pos[id(w)]] for w in self.weights])
        sync()
        t3 = time.perf_counter()
        hessian_now = cfg.hessian == "diag" and self.step_count % cfg.diag_interval == 0
        with sdpa_kernel(SDPBackend.MATH):
            loss_r = torch.nn.functional.mse_loss(self.unet(rb.noisy, rb.t, **kw(rb.cond)).sample.float(),
                                                  r_target.float())
        if hessian_now:
            g_r = torch.autograd.grad(loss_r, self.params, create_graph=True, allow_unused=True)
            g_r = [g if g is not None else torch.zeros_like(p) for g, p in zip(g_r, self.params)]
            for _ in range(cfg.diag_samples):
                z = [torch.randint(0, 2, p.shape, device=p.device).to(p.dtype) * 2 - 1 for p in self.params]
                hz = torch.autograd.grad(sum((g * v).sum() for g, v in zip(g_r, z) if g.requires_grad), self.params,
                                         retain_graph=True, allow_unused=True)
                for d, h, v in zip(self.diag, hz, z):
                    if h is not None:
                        d.mul_(self.count / (self.count + 1)).add_(h * v / (self.count + 1))
                self.count += 1
            g_r = [g.detach() for g in g_r]
        else:
            g_r = torch.autograd.grad(loss_r, self.params, allow_unused=True)
            g_r = [g if g is not None else torch.zeros_like(p) for g, p in zip(g_r, self.params)]
        grads = [gf + cfg.alpha * gr for gf, gr in zip(g_f, g_r)]
        if cfg.hessian == "diag" and self.count:
            grads = [g + cfg.lam * d.clamp(min=0) * (p.detach() - p0)
                     for g, d, p, p0 in zip(grads, self.diag, self.params, self.theta0)]
        sync()
        t4 = time.perf_counter()
        masks = {}
        for t, r in zip(u.targets, rows):
            m = torch.zeros(t.weight.shape[0], device=u.device, dtype=torch.bool)
            m[r] = True
            for p in t.params:
                masks[id(p)] = m.view(-1, *([1] * (p.dim() - 1)))
        for p, g in zip(self.params, grads):
            p.grad = g * masks[id(p)]
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync()
        t5 = time.perf_counter()
        self.step_count += 1
        self.rows = rows
        n = sum(r.numel() for r in rows)
        return {"seconds": t5 - t0, "time_forward": t1 - t0, "time_forget_backward": t2 - t1, "time_localize": t3 - t2,
                "time_retain_backward": t4 - t3, "time_optimizer": t5 - t4, "selected_rows": n,
                "selected_fraction": n / u.total_rows}

    def state_bytes(self) -> dict:
        opt = sum(v.numel() * v.element_size() for s in self.opt.state.values() for v in s.values()
                  if hasattr(v, "numel"))
        frozen = sum(p.numel() * p.element_size() for p in self.frozen.parameters())
        return {"optimizer": opt, "frozen_copy": frozen}


# ----------------------------------------------------------------------------- one method, one process

def unlearner_for(pipe, method: str, batch: tuple[int, int], x0_per_prompt: int, x0_steps: int, seed: int = 0,
                  amp: str = "off", overrides: dict | None = None):
    from trust_fast import TrustUnlearner, methods
    from trust_fast.concepts import parse_concept, user_prompts

    spec = parse_concept("red", world=False)
    prompts = user_prompts(spec, FORGET, RETAIN)
    base = "trust" if method == "trust-naive" else method
    # the step TRUST and trust-naive share, without the adversarial prefix (its refreshes are their own
    # cost, not part of the per-step comparison; trust-naive has none)
    cfg = methods.config(base, seed=seed, batch_size=batch[0], retain_batch_size=batch[1],
                         x0_per_prompt=x0_per_prompt, x0_steps=x0_steps, adv_prefix=0,
                         amp="off" if method == "trust-naive" else amp,
                         **({} if method == "trust-naive" else overrides or {}))
    return TrustUnlearner(pipe, spec, cfg, prompts=prompts)


def run_one(a) -> dict:
    import resource

    import torch

    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    pipe = build_pipeline(a.arch, a.latent, a.tiny).to(dev)
    u = unlearner_for(pipe, a.method, tuple(a.batch), a.x0_per_prompt, a.x0_steps, amp=a.amp,
                      overrides=dict(a.set or []))
    trainable = sum(p.numel() for p in u.params)
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    u.prepare()
    stepper = NaiveTrust(u) if a.method == "trust-naive" else u
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stats = [stepper.step() for _ in range(1 + a.steps)][1:]  # the first step warms up
    med = {k: statistics.median(s[k] for s in stats) for k in
           ("seconds", "time_forward", "time_forget_backward", "time_localize", "time_retain_backward",
            "time_optimizer", "selected_fraction")}
    # the diag Hessian folds new probes in every diag_interval steps: time one such step too
    cfg = u.config
    hess_s, per_run = None, cfg.steps * med["seconds"]
    if cfg.hessian == "diag":
        stepper.step_count = cfg.diag_interval * (stepper.step_count // cfg.diag_interval + 1)
        hess_s = stepper.step()["seconds"]
        n_hess = -(-cfg.steps // cfg.diag_interval)
        per_run = n_hess * hess_s + (cfg.steps - n_hess) * med["seconds"]
    opt_mb = (stepper.state_bytes()["optimizer"] if a.method == "trust-naive"
              else u.state_bytes()["optimizer_state_bytes"]) / 2 ** 20
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[u.amp_dtype]
    return {"method": a.method, "amp": amp, "set": " ".join(f"{k}={v}" for k, v in (a.set or [])), "arch": a.arch + ("-tiny" if a.tiny else ""), "device": a.device, "latent": a.latent,
            "batch": f"{a.batch[0]}+{a.batch[1]}", "unet_params": unet_params, "steps": a.steps,
            "s_per_step": med["seconds"], **{f"{p}_s": med[k] for p, k in zip(PHASES, (
                "time_forward", "time_forget_backward", "time_localize", "time_retain_backward", "time_optimizer"))},
            "hessian_step_s": hess_s, "x0_pool_s": u.pool_seconds, "peak_mem_mb": peak, "optimizer_state_mb": opt_mb,
            "trainable_params": trainable, "selected_fraction": med["selected_fraction"],
            "projected_run_s": u.pool_seconds + per_run, "default_steps": cfg.steps,
            "threads": a.threads}


# ----------------------------------------------------------------------------- driver

def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["method"] == "trust"), None)
    cols = ["method", "amp", "set", "s_per_step", "x", *[f"{p}_s" for p in PHASES], "hessian_step_s", "x0_pool_s", "peak_mem_mb",
            "optimizer_state_mb", "selected_fraction", "projected_run_s"]
    out = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['method']} | {r['error'].split(':')[0]} |" + " |" * (len(cols) - 2))
            continue
        cells = []
        for c in cols:
            if c == "x":
                cells.append(f"{r['s_per_step'] / base['s_per_step']:.2f}x" if base and "error" not in base else "-")
            elif c == "method":
                cells.append(r[c])
            elif c == "amp":  # rows from before TrustConfig.amp ran in float32
                cells.append(r.get(c, "off"))
            elif c == "set":
                cells.append(r.get(c) or "-")
            elif c == "selected_fraction":
                cells.append(f"{r[c]:.3f}")
            elif r.get(c) is None:
                cells.append("-")
            else:
                v = r[c]
                cells.append(f"{v:.3f}" if isinstance(v, float) and v < 10 else
                             f"{v:.1f}" if isinstance(v, float) and v < 100 else f"{v:.0f}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from trust_fast.defaults import AMP_MODES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--latent", type=int, default=32, help="latent size (32 = 256 px, 64 = 512 px)")
    ap.add_argument("--batch", type=int, nargs=2, default=[2, 2], metavar=("F", "R"), help="forget and retain batch")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--x0-per-prompt", type=int, default=1, help="data-free images per prompt (default 1)")
    ap.add_argument("--x0-steps", type=int, default=4, help="DDIM steps of the data-free pool (default 4)")
    ap.add_argument("--amp", choices=AMP_MODES, default="bf16",
                    help="TrustConfig.amp of the library's methods (default bf16: autocast every UNet pass; "
                         "trust-naive stays float32)")
    ap.add_argument("--set", type=_field, action="append", metavar="FIELD=VALUE",
                    help="a TrustConfig field of the library's methods (repeatable), e.g. grad_checkpointing=true")
    ap.add_argument("--tiny", action="store_true", help="tiny configs of the same structure (tests, seconds)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per method")
    ap.add_argument("--mem-limit-gb", type=float, default=None,
                    help="address-space limit of each method's process (CPU: a method that needs more fails "
                         "with an out-of-memory error instead of waking the kernel's OOM killer)")
    ap.add_argument("--out", help="write the rows as CSV here (new, or an earlier one of ours with --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier --out of this script")
    ap.add_argument("--benchmarks-md", help="append the table, with the command, to this Markdown file")
    ap.add_argument("--table-from", nargs="+", metavar="CSV",
                    help="print (and with --benchmarks-md append) the table of rows saved by earlier --out runs")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method in this process, print JSON
    a = ap.parse_args(argv)
    if a.table_from:
        rows = [_typed(r) for f in a.table_from for r in csv.DictReader(open(f))]
        with _claim_out(a) as out:
            _report(rows, a, argv, out)
        return 0
    if a.one:
        a.method = a.one
        print("E2E-RESULT " + json.dumps(run_one(a)), flush=True)
        return 0
    with _claim_out(a) as out:
        rows = _run_methods(a)
        _report(rows, a, argv, out)
    return 0 if all("error" not in r for r in rows) else 1


def _run_methods(a) -> list[dict]:
    """Each method in a fresh process; a row of figures, or of the error that stopped it."""
    rows = []
    for m in a.methods:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", m, "--arch", a.arch, "--latent", str(a.latent),
               "--batch", *map(str, a.batch), "--steps", str(a.steps), "--device", a.device, "--threads",
               str(a.threads), "--x0-per-prompt", str(a.x0_per_prompt), "--x0-steps", str(a.x0_steps), "--amp", a.amp]
        cmd += [f"--set={k}={v}" for k, v in (a.set or [])]
        cmd += ["--tiny"] if a.tiny else []
        print(f"[e2e] {m} ...", file=sys.stderr, flush=True)
        try:
            limit = None
            if a.mem_limit_gb:
                import resource

                n = int(a.mem_limit_gb * 2 ** 30)
                limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (n, n))  # noqa: E731
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, preexec_fn=limit)
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("E2E-RESULT ")), None)
            if line is None:
                oom = "out of memory" in r.stderr.lower() or "MemoryError" in r.stderr or "can't allocate" in r.stderr
                why = ("out of memory" + (f" (limit {a.mem_limit_gb:g} GB)" if a.mem_limit_gb else "") if oom
                       else "killed" if r.returncode < 0 else f"exit {r.returncode}")
                tail = (r.stderr.strip().splitlines() or [""])[-1][:120]
                rows.append({"method": m, "error": f"{why}: {tail}"})
            else:
                rows.append(json.loads(line[len("E2E-RESULT "):]))
        except subprocess.TimeoutExpired:
            rows.append({"method": m, "error": f"over {a.timeout} s"})
        print(f"[e2e] {m}: {rows[-1].get('s_per_step', rows[-1].get('error'))}", file=sys.stderr, flush=True)
    return rows


def _field(text: str) -> tuple[str, object]:
    """FIELD=VALUE of --set: a TrustConfig field and its value (true/false, a number, or text)."""
    from dataclasses import fields

    from trust_fast import TrustConfig

    name, sep, raw = text.partition("=")
    if not sep or name not in {f.name for f in fields(TrustConfig)}:
        raise argparse.ArgumentTypeError(f"{text!r} is not FIELD=VALUE with FIELD a TrustConfig field")
    value = {"true": True, "false": False}.get(raw.lower(), raw)
    if isinstance(value, str):
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                pass
    return name, value


def _typed(row: dict) -> dict:
    """A CSV row with its numbers as numbers and empty cells dropped."""
    out = {}
    for k, v in row.items():
        if v in ("", None):
            continue
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
    return out


def _is_e2e_csv(path: str) -> bool:
    """An earlier --out of this script (its header has the s_per_step column)."""
    try:
        with open(path, newline="") as f:
            return "s_per_step" in (next(csv.reader(f), None) or [])
    except (OSError, UnicodeDecodeError):
        return False


def _claim_out(a):
    """--out, claimed before any work like every trust_fast output: new, or an earlier e2e CSV with
    --overwrite (trust_fast.io.claim_output)."""
    from trust_fast.io import claim_output

    if not a.out:
        return contextlib.nullcontext(None)
    return claim_output(a.out, "--out", kind="file", overwrite=a.overwrite, recognize=_is_e2e_csv)


def _report(rows: list[dict], a, argv, out) -> None:
    from trust_fast.io import atomic_path, write_csv_atomic

    md = table(rows)
    print(md)
    if out is not None:
        keys = sorted({k for r in rows for k in r})
        write_csv_atomic([{k: r.get(k, "") for k in keys} for r in rows], out.path)
    if a.benchmarks_md:
        shown = " ".join(argv if argv is not None else sys.argv[1:])
        with open(a.benchmarks_md, encoding="utf-8") as f:  # appended to, never truncated: all or nothing
            text = f.read()
        with atomic_path(a.benchmarks_md, ".md") as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text + f"\n`python benchmarks/e2e.py {shown}` "
                    f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}):\n\n" + md + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
