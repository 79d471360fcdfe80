"""Architectures of the shapes world: the text-to-image model's configs and the attribute classifier."""
from __future__ import annotations

import torch
from torch import nn

from .vocab import ATTRIBUTES

IMAGE_SIZE = 16


def unet_config() -> dict:
    """Pixel-space UNet, 16 -> 8 -> 4, cross-attention at 8x8, 4x4 and the mid block (7 attn2 layers)."""
    return dict(
        sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8,
    )


def text_config(vocab_size: int, bos: int, eos: int, max_len: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=max_len, projection_dim=64,
                bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)


def scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1)


class AttributeClassifier(nn.Module):
    """Small CNN, one head per attribute. Input (N, 3, 16, 16) in [-1, 1]; `features` gives the
    penultimate 128-d features (used for the Frechet distance), `forward` a dict of logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({a: nn.Linear(128, len(v)) for a, v in ATTRIBUTES.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.body(x)
        return {a: h(f) for a, h in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {a: l.argmax(-1) for a, l in self(x).items()}
