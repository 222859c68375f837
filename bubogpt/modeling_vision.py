"""BLIP-2's EVA ViT-g image encoder followed by `ln_vision`.

pixels (B, 3, S, S) -> patch 14 conv (or a conv stem, `stem_channels`) -> [CLS] + absolute position
embedding -> pre-norm blocks (qkv with q and v biases only) -> no final norm -> ln_vision
-> (B, 1 + (S/14)^2, D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bubogpt.config import VisionEncoderConfig
from bubogpt.modeling_audio import DropPath


class EvaAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        # EVA keeps separate q and v biases; k has none.
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)
        qkv = qkv.view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, nh, N, hs)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class EvaMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EvaBlock(nn.Module):
    def __init__(self, config: VisionEncoderConfig, drop_path: float):
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = EvaAttention(dim, config.num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = EvaMLP(dim, config.mlp_hidden)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class EvaPatchEmbed(nn.Module):
    """EVA's patch_size x patch_size conv, or (`config.stem_channels`) a convolutional stem: per
    width a 3x3 stride-2 conv and a 3x3 conv, with GELU, then a 1x1 `proj` to the width and a
    LayerNorm ("early convolutions"; the last conv sees 43 px, a whole object of a 112-px scene)."""

    def __init__(self, config: VisionEncoderConfig):
        super().__init__()
        if config.stem_channels:
            layers: list[nn.Module] = []
            channels = (3, *config.stem_channels)
            for c_in, c_out in zip(channels[:-1], channels[1:]):
                layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU(),
                           nn.Conv2d(c_out, c_out, 3, padding=1), nn.GELU()]
            self.stem = nn.Sequential(*layers)
            self.proj = nn.Conv2d(channels[-1], config.embed_dim, 1)
            # The stem's output scale drifts from the position embedding's; a LayerNorm fixes it.
            self.norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        else:
            self.stem = self.norm = None
            self.proj = nn.Conv2d(3, config.embed_dim, config.patch_size, config.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is None:
            return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = self.proj(self.stem(x)).flatten(2).transpose(1, 2)  # (B, (S / patch)^2, D)
        return self.norm(x)


class EvaVisionEncoder(nn.Module):
    """EVA ViT (`visual_encoder.*` in BLIP-2) plus `ln_vision`, which BLIP-2 keeps beside it."""

    def __init__(self, config: VisionEncoderConfig):
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, dim))
        self.patch_embed = EvaPatchEmbed(config)
        drop_rates = [config.drop_path * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(EvaBlock(config, p) for p in drop_rates)
        self.ln_vision = nn.LayerNorm(dim, eps=config.ln_vision_eps)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @property
    def num_tokens(self) -> int:
        return self.config.num_patches + 1

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (B, 3, S, S) normalised -> tokens (B, 1 + (S/patch)^2, D)."""
        size = self.config.img_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"image input must be (batch, 3, {size}, {size}), got {tuple(pixel_values.shape)}")
        x = self.patch_embed(pixel_values)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.ln_vision(x)


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Bicubically resize a (1, 1 + g*g, D) position embedding to (1, 1 + num_patches, D).

    As LAVIS does when loading EVA weights trained at another image size; the CLS row is kept.
    """
    old_grid = int(round((pos_embed.shape[1] - 1) ** 0.5))
    new_grid = int(round(num_patches**0.5))
    if old_grid == new_grid:
        return pos_embed
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([cls_pos, grid], dim=1)
