"""Deterministic renderer of the shapes world: one shape on a dark background per image."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .vocab import ATTRIBUTES, TEMPLATES, caption, values

RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.12, 0.80, 0.15),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.12),
}
SUPERSAMPLE = 4  # anti-aliasing: render at 4x and average-pool


@dataclass
class Batch:
    """images: float32 (N, 3, S, S) in [-1, 1]; labels: attribute -> int64 (N,) value indices."""

    images: torch.Tensor
    labels: dict[str, torch.Tensor]

    def attrs(self, i: int) -> dict[str, str]:
        return {a: values(a)[int(self.labels[a][i])] for a in self.labels}


def render(labels: dict[str, torch.Tensor], generator: torch.Generator, size: int = 16) -> torch.Tensor:
    """Render images for given labels (attribute -> int64 (N,)); position, size and hue jitter from `generator`."""
    n = labels["color"].shape[0]
    s = size * SUPERSAMPLE

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=generator)

    cx, cy = u(0.36, 0.64) * size, u(0.36, 0.64) * size
    radius = u(0.26, 0.34) * size
    angle = u(-0.25, 0.25)
    bg = u(0.0, 0.12)
    tint = u(-0.06, 0.06, 3)
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    ca, sa = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    rx, ry = ca * dx + sa * dy, -sa * dx + ca * dy
    r = radius[:, None, None]
    circle = dx**2 + dy**2 <= r**2
    half = r * 0.82
    square = (rx.abs() <= half) & (ry.abs() <= half)
    # upright triangle (apex up) inscribed in the radius, rotated like the square
    h = r * 1.9
    top, bottom = -r, -r + h
    frac = ((ry - top) / h).clamp(0, 1)
    triangle = (ry >= top) & (ry <= bottom) & (rx.abs() <= frac * r * 1.1)
    shape_idx = labels["shape"][:, None, None]
    shape_names = values("shape")
    masks = {"circle": circle, "square": square, "triangle": triangle}
    inside = torch.zeros_like(circle)
    for k, name in enumerate(shape_names):
        inside |= masks[name] & (shape_idx == k)
    stripes = (torch.floor(yy[None] / 2.0) % 2 == 0).expand_as(inside)
    striped = labels["texture"][:, None, None] == values("texture").index("striped")
    dim = striped & ~stripes  # the dark band of a striped shape
    color = torch.tensor([RGB[c] for c in values("color")])[labels["color"]] + tint  # (N, 3)
    color = color.clamp(0, 1)[:, :, None, None]
    shade = torch.where(dim, 0.3, 1.0)[:, None]
    img = torch.where(inside[:, None], color * shade, bg[:, None, None, None].expand(n, 1, s, s))
    img = torch.nn.functional.avg_pool2d(img, SUPERSAMPLE)
    return img * 2 - 1


def sample_labels(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {a: torch.randint(len(v), (n,), generator=generator) for a, v in ATTRIBUTES.items()}


def generate(n: int, seed: int, size: int = 16) -> Batch:
    """n random images with labels; the same seed gives the same batch."""
    g = torch.Generator().manual_seed(seed)
    labels = sample_labels(n, g)
    return Batch(render(labels, g, size), labels)


def random_captions(batch: Batch, generator: torch.Generator, p_drop: dict[str, float] | None = None,
                    p_synonym: float = 0.25, p_uncond: float = 0.1, n_templates: int | None = None) -> list[str]:
    """Training captions for a batch: attributes randomly omitted, synonyms and templates mixed in,
    and a fraction of empty captions for classifier-free guidance."""
    p_drop = p_drop or {"color": 0.15, "shape": 0.15, "texture": 0.35}
    n_templates = n_templates or len(TEMPLATES)
    out = []
    n = batch.images.shape[0]
    rnd = torch.rand(n, 8, generator=generator).tolist()
    tpl = torch.randint(n_templates, (n,), generator=generator).tolist()
    for i in range(n):
        r = rnd[i]
        if r[0] < p_uncond:
            out.append("")
            continue
        attrs = batch.attrs(i)
        kept = {a: v for j, (a, v) in enumerate(attrs.items()) if r[1 + j] >= p_drop[a]}
        if not kept:
            kept = {"shape": attrs["shape"]}
        syn = {}
        for j, a in enumerate(kept):
            alts = ATTRIBUTES[a][kept[a]]
            if r[4 + j] < p_synonym:
                syn[a] = alts[int(r[7] * len(alts)) % len(alts)]
        out.append(caption(kept, tpl[i], syn))
    return out


def save_grid(images: torch.Tensor, path: str, nrow: int = 8, scale: int = 4, labels: list[str] | None = None) -> None:
    """Save (N, 3, H, W) images in [-1, 1] as one PNG grid (nearest upscaled), atomically.
    With `labels`, each row gets its label drawn on the left."""
    from PIL import Image, ImageDraw

    from ..io import atomic_path

    n, _, h, w = images.shape
    rows = math.ceil(n / nrow)
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    pad = 2
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 0 if not labels else 12 + int(max(measure.textlength(s) for s in labels))
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = Image.new("RGB", (label_w + nrow * cell_w + pad, rows * cell_h + pad), (255, 255, 255))
    for i in range(n):
        tile = Image.fromarray(x[i].permute(1, 2, 0).numpy()).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (label_w + pad + (i % nrow) * cell_w, pad + (i // nrow) * cell_h))
    if labels:
        draw = ImageDraw.Draw(canvas)
        for r, text in enumerate(labels[:rows]):
            draw.text((4, pad + r * cell_h + cell_h // 2 - 6), text, fill=(0, 0, 0))
    with atomic_path(path, ".png") as tmp:
        canvas.save(tmp, format="PNG")
