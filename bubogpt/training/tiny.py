"""The tiny preset's starting model: nothing of it is pretrained, so it is built here, with the
spatial prior that lets its vision Q-Former learn where things are in a few hundred steps."""

from __future__ import annotations

import torch

def build_tiny_model(seed: int = 0, vocab_size: int = 1024, spatial_prior: bool = True):
    """A randomly initialised tiny BuboGPT with a byte-level BPE tokenizer trained on the corpus
    vocabulary (`vocab.sample_texts`); deterministic for a seed. `spatial_prior`: see
    `init_spatial_prior` (tiny recipe only)."""
    from bubogpt.config import tiny
    from bubogpt.data.vocab import sample_texts
    from bubogpt.modeling_bubogpt import BuboGPT
    from bubogpt.tokenizer import build_tiny_tokenizer

    torch.manual_seed(seed)
    model = BuboGPT.build(tiny(), build_tiny_tokenizer(sample_texts(), vocab_size))
    if spatial_prior:
        init_spatial_prior(model)
    return model


def sincos_2d(rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) row and column coordinates -> (N, dim) [sin x, cos x, sin y, cos y] features, dim/4
    frequencies each (MAE's 2-D position embedding). Two codes' dot product peaks where they meet."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    x, y = cols.float()[:, None] * omega, rows.float()[:, None] * omega
    return torch.cat([torch.sin(x), torch.cos(x), torch.sin(y), torch.cos(y)], dim=1)


@torch.no_grad()
def init_spatial_prior(model, sharpness: float = 1.5, position_scale: float = 2.0) -> None:
    """Tiny recipe only: start the vision Q-Former's queries looking at different places.

    A random vision encoder and Q-Former attend almost uniformly over the image tokens at first, so
    every query returns about the image's mean and where things are (and which colour goes with
    which place) is averaged away; learning to attend sharply from the LM loss alone is slow
    (issue #4). Here: the encoder's position embedding becomes a 2-D sin-cos code, the Q queries are
    the codes of a sqrt(Q) x sqrt(Q) grid of image places, and the first cross-attention's query and
    key projections are `sharpness` x identity, so at step 0 each query attends around its own
    place (code dot products peak where positions meet). Everything stays trainable. A pretrained
    BLIP-2 (7b/13b) brings its own attention: this is never applied to them.
    """
    vision, qformer = model.vision_encoder, model.joiner.qformers["vision"]
    dim, hidden = vision.config.embed_dim, qformer.config.hidden_size
    if dim != hidden or dim % 4:
        raise ValueError(f"the spatial prior needs the Q-Former width ({hidden}) to equal the encoder width ({dim}), a multiple of 4")
    grid = vision.config.img_size // vision.config.patch_size
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    codes = sincos_2d(rows.flatten(), cols.flatten(), dim) * position_scale  # (grid * grid, D)
    vision.pos_embed.copy_(torch.cat([torch.zeros(1, dim), codes])[None])  # CLS keeps a zero code
    side = int(round(qformer.config.num_query_token**0.5))
    if side * side != qformer.config.num_query_token:
        raise ValueError(f"the spatial prior needs a square number of queries, got {qformer.config.num_query_token}")
    places = torch.linspace(0.5, grid - 1.5, side)  # cell centres of a side x side grid over the patches
    q_rows, q_cols = torch.meshgrid(places, places, indexing="ij")
    qformer.query_tokens.copy_(sincos_2d(q_rows.flatten(), q_cols.flatten(), dim)[None])
    cross = next(layer.cross_attn for layer in qformer.layers if layer.cross_attn is not None)
    for projection in (cross.query, cross.key):
        projection.weight.copy_(torch.eye(dim) * sharpness)
        projection.bias.zero_()

