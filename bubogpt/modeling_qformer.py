"""BLIP-2 Q-Former, query path only, and the projection into the LLM.

Learned queries (B, Q, H) -> LayerNorm -> per layer: self-attention over the queries,
cross-attention to the encoder tokens on every `cross_attention_freq`-th layer, feed-forward
(post-norm BERT blocks, LayerNorm eps 1e-12) -> (B, Q, H) -> Linear -> (B, Q, llm_hidden).

BuboGPT never feeds text to its Q-Formers, so the text-side weights of the original checkpoints
(word/position embeddings, the text feed-forward, the MLM head) are not part of this module; the
loaders list them as ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bubogpt.config import QFormerConfig


class BertAttention(nn.Module):
    """Multi-head attention + output dense + residual + LayerNorm (post-norm), keys from `context`."""

    def __init__(self, hidden: int, context_width: int, num_heads: int, eps: float, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(context_width, hidden)
        self.value = nn.Linear(context_width, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, Q, H = x.shape
        hs = H // self.num_heads
        q = self.query(x).view(B, Q, self.num_heads, hs).transpose(1, 2)  # (B, nh, Q, hs)
        k = self.key(context).view(B, -1, self.num_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.value(context).view(B, -1, self.num_heads, hs).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        attn = attn.transpose(1, 2).reshape(B, Q, H)
        return self.norm(x + F.dropout(self.out(attn), p, self.training))


class BertFeedForward(nn.Module):
    def __init__(self, hidden: int, intermediate: int, eps: float, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(F.gelu(self.fc1(x)))
        return self.norm(x + F.dropout(h, self.dropout, self.training))


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, has_cross_attention: bool):
        super().__init__()
        h, eps, p = config.hidden_size, config.layer_norm_eps, config.dropout
        self.self_attn = BertAttention(h, h, config.num_heads, eps, p)
        self.cross_attn = (
            BertAttention(h, config.encoder_width, config.num_heads, eps, p)
            if has_cross_attention
            else None
        )
        self.ffn = BertFeedForward(h, config.intermediate_size, eps, p)

    def forward(self, x: torch.Tensor, encoder_tokens: torch.Tensor) -> torch.Tensor:
        x = self.self_attn(x, x)
        if self.cross_attn is not None:
            x = self.cross_attn(x, encoder_tokens)
        return self.ffn(x)


class QFormer(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.config = config
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_token, config.hidden_size))
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(
            QFormerLayer(config, has_cross_attention=i % config.cross_attention_freq == 0)
            for i in range(config.num_layers)
        )
        nn.init.normal_(self.query_tokens, std=0.02)

    def forward(self, encoder_tokens: torch.Tensor) -> torch.Tensor:
        """encoder_tokens: (B, T, encoder_width) -> query states (B, Q, hidden)."""
        if encoder_tokens.shape[-1] != self.config.encoder_width:
            raise ValueError(
                f"Q-Former expects encoder tokens of width {self.config.encoder_width}, "
                f"got {encoder_tokens.shape[-1]}"
            )
        x = self.query_tokens.expand(encoder_tokens.shape[0], -1, -1)
        x = F.dropout(self.layernorm(x), self.config.dropout, self.training)
        for layer in self.layers:
            x = layer(x, encoder_tokens)
        return x


class ModalityProjection(nn.Module):
    """`Linear(qformer_hidden -> llm_hidden)`; named `fc` as in BuboGPT's post-projectors."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class MultimodalJoiner(nn.Module):
    """One Q-Former and one projection per modality: encoder tokens -> LLM input embeddings."""

    MODALITIES = ("audio", "vision")

    def __init__(self, audio: QFormerConfig, vision: QFormerConfig, llm_hidden: int):
        super().__init__()
        self.qformers = nn.ModuleDict({"audio": QFormer(audio), "vision": QFormer(vision)})
        self.projections = nn.ModuleDict(
            {
                "audio": ModalityProjection(audio.hidden_size, llm_hidden),
                "vision": ModalityProjection(vision.hidden_size, llm_hidden),
            }
        )

    def forward(self, modality: str, encoder_tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, encoder_width) -> (B, Q, llm_hidden)."""
        return self.projections[modality](self.qformers[modality](encoder_tokens))
