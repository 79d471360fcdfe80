"""Weight shapes of the Stable Diffusion 1.5 UNet, from its config (no download).

``unet_shapes()`` builds ``diffusers.UNet2DConditionModel`` from the SD 1.5
config on the meta device (no memory, no weights) and returns the weight
shapes of the three benchmark sets:

- ``a``: attn2 to_q / to_k / to_v weights (cross-attention projections)
- ``b``: every Linear weight of the attention blocks and FFNs (transformer blocks)
- ``c``: every Linear and Conv2d weight of the UNet

``HARDCODED_A`` / ``HARDCODED_B`` give the shapes of sets a and b without
diffusers, and ``sd15_unet_shapes.json`` (written from ``unet_shapes()``) all
three sets: the GPU image has no diffusers.  ``unet_shapes`` checks they agree.
"""


from __future__ import annotations

import json
from pathlib import Path

SHAPES_JSON = Path(__file__).resolve().parent / "sd15_unet_shapes.json"

SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)

# transformer blocks of SD 1.5: inner dim of each, in module order (down, up, mid)
_BLOCK_DIMS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]
_CROSS = 768


def _attn2_qkv(d: int) -> list[tuple[int, ...]]:
    return [(d, d), (d, _CROSS), (d, _CROSS)]


HARDCODED_A: list[tuple[int, ...]] = [s for d in _BLOCK_DIMS for s in _attn2_qkv(d)]
HARDCODED_B: list[tuple[int, ...]] = [
    s
    for d in _BLOCK_DIMS
    for s in (
        [(d, d)] * 4  # attn1 q, k, v, out
        + [(d, d), (d, _CROSS), (d, _CROSS), (d, d)]  # attn2 q, k, v, out
        + [(8 * d, d), (d, 4 * d)]  # FFN GEGLU proj (2 x 4d) and down projection
    )
]


def unet_shapes() -> dict[str, list[tuple[int, ...]]]:
    """Shapes of sets a, b, c from the SD 1.5 UNet built on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    sets: dict[str, list[tuple[int, ...]]] = {"a": [], "b": [], "c": []}
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        shape = tuple(module.weight.shape)
        sets["c"].append(shape)
        if ".transformer_blocks." in name and isinstance(module, torch.nn.Linear):
            sets["b"].append(shape)
            if any(name.endswith(f"attn2.{p}") for p in ("to_q", "to_k", "to_v")):
                sets["a"].append(shape)
    if sets["a"] != HARDCODED_A or sets["b"] != HARDCODED_B or sets != stored_shapes():
        raise RuntimeError("hard-coded or stored SD 1.5 shapes disagree with the diffusers model")
    return sets


def stored_shapes() -> dict[str, list[tuple[int, ...]]]:
    """Shapes of sets a, b, c as stored in sd15_unet_shapes.json (no diffusers needed)."""
    raw = json.loads(SHAPES_JSON.read_text())
    return {k: [tuple(s) for s in v] for k, v in raw.items()}


def row_count(n_rows: int, fraction: float) -> int:
    """Rows a benchmark selects at ``fraction`` of ``n_rows``: at least one."""
    return max(1, round(fraction * n_rows))


def random_rows(n_rows: int, fraction: float, generator=None, device=None):
    """A random, ascending ``row_count(n_rows, fraction)`` of ``range(n_rows)``: the benchmarks' row sets."""
    import torch

    return torch.randperm(n_rows, generator=generator, device=device)[: row_count(n_rows, fraction)].sort().values


def summary(shapes: list[tuple[int, ...]]) -> tuple[int, int]:
    """(parameters, output rows) of a list of weight shapes."""
    params = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        params += n
    return params, sum(s[0] for s in shapes)
