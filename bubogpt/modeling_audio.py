"""ImageBind-Huge audio encoder, as BuboGPT uses it: the audio trunk without its head.

fbank clips (B, S, 1, 128, 204) -> per clip: Conv2d stem -> LayerNorm -> [CLS] + position embedding
-> pre-norm transformer blocks -> L2-normalise each token -> x logit scale -> mean over clips
-> (B, 229, D) tokens for the audio Q-Former.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bubogpt.config import AudioEncoderConfig


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class AudioMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AudioBlock(nn.Module):
    """Pre-norm block; attention is `nn.MultiheadAttention` with `add_bias_kv` as in ImageBind."""

    def __init__(self, config: AudioEncoderConfig, drop_path: float):
        super().__init__()
        dim = config.embed_dim
        self.norm_1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = nn.MultiheadAttention(
            dim, config.num_heads, bias=True, add_bias_kv=True, batch_first=True
        )
        self.norm_2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = AudioMLP(dim, int(dim * config.mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm_1(x)
        x = x + self.drop_path(self.attn(h, h, h, need_weights=False)[0])
        return x + self.drop_path(self.mlp(self.norm_2(x)))


class ImageBindAudioEncoder(nn.Module):
    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = nn.Conv2d(
            1, dim, kernel_size=config.kernel_size, stride=config.stride, bias=False
        )
        # ImageBind's stem norm is a plain nn.LayerNorm (eps 1e-5), unlike the trunk's 1e-6.
        self.patch_norm = nn.LayerNorm(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, dim))
        drop_rates = [config.drop_path * i / max(config.num_blocks - 1, 1) for i in range(config.num_blocks)]
        self.blocks = nn.ModuleList(AudioBlock(config, p) for p in drop_rates)
        # Fixed in ImageBind (learnable=False) but stored in the checkpoint: a buffer.
        self.register_buffer(
            "log_logit_scale", torch.tensor(math.log(config.logit_scale)), persistent=True
        )
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @property
    def num_tokens(self) -> int:
        return self.config.num_patches + 1

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        """fbank: (B, S, 1, n_mels, frames) normalised clips -> tokens (B, 1 + num_patches, D)."""
        if fbank.ndim != 5 or fbank.shape[2] != 1:
            raise ValueError(f"audio input must be (batch, clips, 1, mels, frames), got {tuple(fbank.shape)}")
        expected = (self.config.num_mel_bins, self.config.target_length)
        if tuple(fbank.shape[3:]) != expected:
            raise ValueError(f"audio fbank must be {expected} (mels, frames), got {tuple(fbank.shape[3:])}")
        batch, clips = fbank.shape[:2]
        x = fbank.flatten(0, 1)  # (B*S, 1, M, T)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B*S, P, D)
        x = self.patch_norm(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = F.normalize(x, dim=-1) * self.log_logit_scale.exp().clamp(max=100.0)
        return x.view(batch, clips, *x.shape[1:]).mean(dim=1)  # (B, P + 1, D)
