"""Pictures of results: labelled before/after image grids and history plots (PNG, written atomically)."""
from __future__ import annotations

import os

import torch

from ..io import atomic_path
from ..world.render import save_grid


def before_after_grid(before: torch.Tensor, after: torch.Tensor, prompts: list[str], n_per_prompt: int,
                      path: str, max_rows: int = 12, labels: tuple[str, str] = ("before", "after")) -> None:
    """One row per prompt: its `n_per_prompt` images before, a blank column, then after (`labels`
    names the two halves in each row's caption).
    `before`/`after` are prompt-major (len(prompts) * n_per_prompt, C, H, W) in [-1, 1], same noise."""
    if before.shape != after.shape or before.shape[0] != len(prompts) * n_per_prompt:
        raise ValueError(f"before {tuple(before.shape)} and after {tuple(after.shape)} must both hold "
                         f"{n_per_prompt} images for each of {len(prompts)} prompts")
    rows = min(len(prompts), max_rows)
    c, h, w = before.shape[1:]
    blank = torch.ones(1, c, h, w)  # white separator between before and after
    tiles = []
    for r in range(rows):
        sl = slice(r * n_per_prompt, (r + 1) * n_per_prompt)
        tiles += [before[sl].cpu(), blank, after[sl].cpu()]
    save_grid(torch.cat(tiles), path, nrow=2 * n_per_prompt + 1, scale=max(1, 64 // h),
              labels=[f"{p}  ({labels[0]} | {labels[1]})" for p in prompts[:rows]])


def write_grids(directory: str, sets: dict[str, tuple[list[str], torch.Tensor, torch.Tensor]],
                labels: tuple[str, str] = ("before", "after")) -> list[str]:
    """``{directory}/{name}.png`` for each ``name: (prompts, before, after)`` (see before_after_grid;
    each set's images per prompt is its image count over its prompt count); returns the file names
    written."""
    os.makedirs(directory, exist_ok=True)
    for name, (prompts, before, after) in sets.items():
        n = before.shape[0] // max(1, len(prompts))
        before_after_grid(before, after, prompts, n, os.path.join(directory, f"{name}.png"), labels=labels)
    return [f"{name}.png" for name in sets]


def plot_history(history: list[dict], path: str, title: str = "",
                 keys: tuple[str, ...] = ("ua", "retain_acc")) -> None:
    """Line plot of the given metrics against `step` for the history entries that carry them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    plotted = False
    for key in keys:
        pts = [(h["step"], h[key]) for h in history if key in h and h[key] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", ms=3, label=key)
            plotted = True
    if not plotted:
        plt.close(fig)
        raise ValueError(f"history has no entries with any of {keys}")
    ax.set_xlabel("unlearning step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
