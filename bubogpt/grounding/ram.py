"""RAM (Recognize Anything) image tagger: Swin encoder + query-to-label tagging head.

Read top to bottom: config and presets, the Swin Transformer encoder, the tagging head, the tagger.

    pixel_values (B, 3, H, W)
      -> Swin (patch 4, shifted windows, patch merging, final LayerNorm)       (B, L, vision_width)
      -> prepend the mean token, image_proj                                   (B, 1 + L, image_embed_dim)
    label_embed (num_tags, image_embed_dim) -> relu(label_proj) = one query per tag   (num_tags, hidden)
      -> tagging head: per layer cross-attention to the image embeddings, then a BERT feed-forward
         (post-norm; no self-attention and no embedding layer, as in Query2Label)    (B, num_tags, hidden)
      -> classifier: one logit per tag                                           (B, num_tags)

A tag is present when sigmoid(logit) > its threshold. Only the tagging path of the released model is
here; its captioning branch (`tag_encoder`, `text_decoder`) is not used by BuboGPT.

Input sizes: RAM was trained at `config.image_size` (square) and `preprocess_image` resizes to it.
Other sizes also run: the image is zero-padded to a multiple of the patch size, each Swin block
pads its token grid to a multiple of its window and masks the padded tokens out of attention, and
patch merging pads an odd grid by one row/column. Tags are only as good as at the trained size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Additive attention-mask value the original Swin uses between tokens that must not attend.
MASKED = -100.0


class RAMInputError(ValueError):
    """An input the tagger cannot use (wrong rank, channels, threshold count, ...)."""


@dataclass
class RAMConfig:
    """Dimensions of a RAM tagger. Defaults equal the released `ram_swin_large_14m.pth`."""

    image_size: int = 384  # the trained (square) input size; also fixes each stage's window clamp
    patch_size: int = 4
    embed_dim: int = 192  # Swin stage-0 width; stage i has embed_dim * 2**i
    depths: list[int] = field(default_factory=lambda: [2, 2, 18, 2])
    num_heads: list[int] = field(default_factory=lambda: [6, 12, 24, 48])
    window_size: int = 12
    mlp_ratio: float = 4.0
    swin_layer_norm_eps: float = 1e-5
    image_embed_dim: int = 512  # width of image_proj and of label_embed (CLIP text-embedding width)
    tag_head_hidden: int = 768
    tag_head_heads: int = 4  # q2l_config.json: 4 heads (not BERT-base's 12)
    tag_head_intermediate: int = 3072
    tag_head_layers: int = 2
    tag_head_layer_norm_eps: float = 1e-12
    num_tags: int = 4585

    def __post_init__(self) -> None:
        self.depths = list(self.depths)
        self.num_heads = list(self.num_heads)
        if len(self.depths) != len(self.num_heads):
            raise ValueError(
                f"RAMConfig: depths {self.depths} and num_heads {self.num_heads} differ in length"
            )
        for stage, heads in enumerate(self.num_heads):
            width = self.embed_dim * 2**stage
            if width % heads:
                raise ValueError(
                    f"RAMConfig: Swin stage {stage} width {width} is not divisible by {heads} heads"
                )
        if self.tag_head_hidden % self.tag_head_heads:
            raise ValueError(
                f"RAMConfig: tag_head_hidden {self.tag_head_hidden} is not divisible by "
                f"tag_head_heads {self.tag_head_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"RAMConfig: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )

    @property
    def vision_width(self) -> int:
        """Width of the last Swin stage (1536 for Swin-L)."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    def stage_resolution(self, stage: int) -> int:
        """Token-grid side of `stage` at the trained image size (96, 48, 24, 12 for Swin-L 384)."""
        return self.image_size // self.patch_size // 2**stage

    def stage_window(self, stage: int) -> tuple[int, int]:
        """(window, shift) of the stage's shifted blocks at the trained size.

        As in the original: a stage whose grid fits in one window uses a window of the grid's size
        and no shift. This decides the shape of the relative-position tables in a checkpoint.
        """
        resolution = self.stage_resolution(stage)
        if resolution <= self.window_size:
            return resolution, 0
        return self.window_size, self.window_size // 2


def ram_swin_large() -> RAMConfig:
    """The released `ram_swin_large_14m.pth`: Swin-L at 384 px, 4585 tags, 2-layer tagging head."""
    return RAMConfig()


def ram_tiny(num_tags: int = 12) -> RAMConfig:
    """This project's own small tagger for synthetic scenes: 128 px, stage widths 32..256."""
    return RAMConfig(
        image_size=128,
        embed_dim=32,
        depths=[1, 1, 2, 1],
        num_heads=[1, 2, 4, 8],
        window_size=4,  # grids 32, 16, 8, 4: the last stage is one window
        image_embed_dim=64,
        tag_head_hidden=64,
        tag_head_heads=2,
        tag_head_intermediate=128,
        tag_head_layers=2,
        num_tags=num_tags,
    )


# ---------------------------------------------------------------------------------------------------
# Image preprocessing (the original `get_transform`)
# ---------------------------------------------------------------------------------------------------


def preprocess_image(image: Image.Image, image_size: int) -> torch.Tensor:
    """RGB, resize to (image_size, image_size) bilinear, ImageNet normalisation -> (3, S, S)."""
    image = TF.resize(image.convert("RGB"), [image_size, image_size])
    return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


# ---------------------------------------------------------------------------------------------------
# Swin Transformer encoder (key names follow the Microsoft implementation that RAM ships)
# ---------------------------------------------------------------------------------------------------


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/window * W/window, window, window, C), windows in row-major order."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, channels)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B * nW, window, window, C) -> (B, H, W, C)."""
    channels = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def window_attention_mask(
    height: int, width: int, window: int, shift: int, device: torch.device
) -> torch.Tensor | None:
    """Additive mask (nW, window², window²) for a block on an (height, width) grid, or None.

    The grid is padded at the bottom/right to a multiple of `window` and then rolled by -shift.
    Two tokens of one window may attend to each other only when they come from the same region of
    the cyclic shift (the original Swin rule) and are both real or both padding; else MASKED.
    """
    padded_h = -(-height // window) * window
    padded_w = -(-width // window) * window
    if shift == 0 and (padded_h, padded_w) == (height, width):
        return None
    region = torch.zeros(padded_h, padded_w, device=device)
    if shift > 0:
        bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
        for i, rows in enumerate(bands):
            for j, cols in enumerate(bands):
                region[rows, cols] = 3 * i + j
    is_padding = torch.ones(padded_h, padded_w, device=device)
    is_padding[:height, :width] = 0
    region = region + 9 * torch.roll(is_padding, shifts=(-shift, -shift), dims=(0, 1))
    region_windows = window_partition(region[None, :, :, None], window).flatten(1)  # (nW, N)
    differs = region_windows[:, None, :] != region_windows[:, :, None]  # (nW, N, N)
    return torch.zeros(differs.shape, device=device).masked_fill(differs, MASKED)


def relative_position_index(window: int) -> torch.Tensor:
    """(window², window²) index into the (2*window-1)² relative-position table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (N, N, 2)
    return relative[:, :, 0] * (2 * window - 1) + relative[:, :, 1]


class SwinPatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size conv + LayerNorm."""

    def __init__(self, config: RAMConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.proj = nn.Conv2d(3, config.embed_dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.swin_layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(B, 3, H, W) -> tokens (B, h*w, C) and the grid (h, w), h = ceil(H / patch)."""
        pad_h = -pixel_values.shape[2] % self.patch_size
        pad_w = -pixel_values.shape[3] % self.patch_size
        pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))
        x = self.proj(pixel_values)  # (B, C, h, w)
        height, width = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class SwinWindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative-position bias."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        # Rebuilt here, so not saved: a checkpoint's copy is ignored by the loader.
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """windows (B * nW, N, C), mask (nW, N, N) or None -> (B * nW, N, C); N = window²."""
        batch_windows, tokens, channels = windows.shape
        head_dim = channels // self.num_heads
        qkv = self.qkv(windows).view(batch_windows, tokens, 3, self.num_heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B * nW, nh, N, hd)

        bias = self.relative_position_bias_table[self.relative_position_index.flatten()]
        bias = bias.view(tokens, tokens, self.num_heads).permute(2, 0, 1)  # (nh, N, N)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        else:
            num_windows = mask.shape[0]
            bias = bias[None] + mask[:, None]  # (nW, nh, N, N)
            shape = (-1, num_windows, self.num_heads, tokens, head_dim)  # (B, nW, nh, N, hd)
            out = F.scaled_dot_product_attention(
                q.reshape(shape), k.reshape(shape), v.reshape(shape), attn_mask=bias.to(q.dtype)
            )
        out = out.reshape(batch_windows, self.num_heads, tokens, head_dim).transpose(1, 2)
        return self.proj(out.reshape(batch_windows, tokens, channels))


class SwinMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, config: RAMConfig):
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim, eps=config.swin_layer_norm_eps)
        self.attn = SwinWindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim, eps=config.swin_layer_norm_eps)
        self.mlp = SwinMlp(dim, int(dim * config.mlp_ratio))

    def forward(self, x: torch.Tensor, height: int, width: int, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, H*W, C) on an (height, width) grid; mask from `window_attention_mask`."""
        batch, _, channels = x.shape
        shortcut = x
        x = self.norm1(x).view(batch, height, width, channels)
        x = F.pad(x, (0, 0, 0, -width % self.window, 0, -height % self.window))  # (B, Hp, Wp, C)
        padded_h, padded_w = x.shape[1:3]
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = window_partition(x, self.window).flatten(1, 2)  # (B * nW, N, C)
        windows = self.attn(windows, mask)
        windows = windows.view(-1, self.window, self.window, channels)
        x = window_reverse(windows, self.window, padded_h, padded_w)  # (B, Hp, Wp, C)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x[:, :height, :width].reshape(batch, height * width, channels)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class SwinPatchMerging(nn.Module):
    """2x2 neighbouring tokens -> one token of twice the width: LayerNorm(4C) then Linear(4C, 2C)."""

    def __init__(self, dim: int, config: RAMConfig):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=config.swin_layer_norm_eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, int, int]:
        """(B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 2C) and the new grid."""
        batch, _, channels = x.shape
        x = x.view(batch, height, width, channels)
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))  # odd grids: one zero row / column
        # Order (top-left, bottom-left, top-right, bottom-right) is what the weights expect.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        height, width = x.shape[1:3]
        x = self.reduction(self.norm(x.view(batch, height * width, 4 * channels)))
        return x, height, width


class SwinStage(nn.Module):
    """`depth` blocks alternating plain and shifted windows, then (except last) patch merging."""

    def __init__(self, stage: int, config: RAMConfig):
        super().__init__()
        dim = config.embed_dim * 2**stage
        window, shift = config.stage_window(stage)
        self.window = window
        self.shift = shift
        self.blocks = nn.ModuleList(
            SwinBlock(dim, config.num_heads[stage], window, shift if i % 2 else 0, config)
            for i in range(config.depths[stage])
        )
        is_last = stage == len(config.depths) - 1
        self.downsample = None if is_last else SwinPatchMerging(dim, config)

    def forward(self, x: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, int, int]:
        # One mask per kind of block, shared by all blocks of the stage.
        plain_mask = window_attention_mask(height, width, self.window, 0, x.device)
        shifted_mask = window_attention_mask(height, width, self.window, self.shift, x.device)
        for block in self.blocks:
            x = block(x, height, width, shifted_mask if block.shift else plain_mask)
        if self.downsample is not None:
            x, height, width = self.downsample(x, height, width)
        return x, height, width


class SwinEncoder(nn.Module):
    """Swin Transformer without a classification head."""

    def __init__(self, config: RAMConfig):
        super().__init__()
        self.patch_embed = SwinPatchEmbed(config)
        self.layers = nn.ModuleList(SwinStage(i, config) for i in range(len(config.depths)))
        self.norm = nn.LayerNorm(config.vision_width, eps=config.swin_layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> last-stage tokens (B, L, vision_width); L = 144 for Swin-L at 384 px."""
        x, height, width = self.patch_embed(pixel_values)
        for stage in self.layers:
            x, height, width = stage(x, height, width)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------------
# Tagging head (Query2Label decoder)
# ---------------------------------------------------------------------------------------------------


class RAMTaggingLayer(nn.Module):
    """Label queries cross-attend to the image embeddings, then a BERT feed-forward; post-norm."""

    def __init__(self, config: RAMConfig):
        super().__init__()
        hidden = config.tag_head_hidden
        self.num_heads = config.tag_head_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(config.image_embed_dim, hidden)
        self.value = nn.Linear(config.image_embed_dim, hidden)
        self.attention_out = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=config.tag_head_layer_norm_eps)
        self.ffn_in = nn.Linear(hidden, config.tag_head_intermediate)
        self.ffn_out = nn.Linear(config.tag_head_intermediate, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=config.tag_head_layer_norm_eps)

    def forward(self, queries: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """queries (B, T, D), image_embeds (B, L, E) -> (B, T, D)."""
        batch, num_queries, hidden = queries.shape
        head_dim = hidden // self.num_heads

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, self.num_heads, head_dim).transpose(1, 2)  # (B, nh, T or L, hd)

        q = split_heads(self.query(queries))
        k = split_heads(self.key(image_embeds))
        v = split_heads(self.value(image_embeds))
        context = F.scaled_dot_product_attention(q, k, v)  # every image token is real: no mask
        context = context.transpose(1, 2).reshape(batch, num_queries, hidden)
        x = self.attention_norm(queries + self.attention_out(context))
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))


# ---------------------------------------------------------------------------------------------------
# The tagger
# ---------------------------------------------------------------------------------------------------


class RAMTagger(nn.Module):
    """RAM's tagging path. `tag_names` (one per tag, in checkpoint order) is needed only by `tag`."""

    def __init__(self, config: RAMConfig, tag_names: list[str] | None = None):
        super().__init__()
        if tag_names is not None and len(tag_names) != config.num_tags:
            raise RAMInputError(f"got {len(tag_names)} tag names for a model with {config.num_tags} tags")
        self.config = config
        self.tag_names = list(tag_names) if tag_names is not None else None
        self.vision_encoder = SwinEncoder(config)
        self.image_proj = nn.Linear(config.vision_width, config.image_embed_dim)
        # One (frozen CLIP text) embedding per tag in the release; learned from scratch in ram_tiny.
        self.label_embed = nn.Parameter(torch.zeros(config.num_tags, config.image_embed_dim))
        # The original skips the projection when the head is already as wide as the label embedding.
        if config.tag_head_hidden == config.image_embed_dim:
            self.label_proj = nn.Identity()
        else:
            self.label_proj = nn.Linear(config.image_embed_dim, config.tag_head_hidden)
        self.tagging_head = nn.ModuleList(RAMTaggingLayer(config) for _ in range(config.tag_head_layers))
        self.classifier = nn.Linear(config.tag_head_hidden, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal(0.02) linears, unit LayerNorms, as the original initialises them."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, SwinWindowAttention):
                nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)
        nn.init.normal_(self.label_embed, std=0.02)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> image embeddings (B, 1 + L, image_embed_dim), mean token first."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise RAMInputError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")
        tokens = self.vision_encoder(pixel_values)  # (B, L, vision_width)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # (B, 1 + L, vision_width)
        return self.image_proj(tokens)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised (ImageNet mean/std) -> logits (B, num_tags)."""
        image_embeds = self.encode_image(pixel_values)
        queries = F.relu(self.label_proj(self.label_embed))  # (num_tags, D)
        queries = queries.unsqueeze(0).expand(image_embeds.shape[0], -1, -1)  # (B, num_tags, D)
        for layer in self.tagging_head:
            queries = layer(queries, image_embeds)
        return self.classifier(queries).squeeze(-1)

    @torch.no_grad()
    def tag(self, pixel_values: torch.Tensor, thresholds: torch.Tensor | float) -> list[list[str]]:
        """Tag names present in each image, in tag-list order; thresholds: (num_tags,) or one float."""
        if self.tag_names is None:
            raise RAMInputError("this RAMTagger was built without tag_names; pass them to the constructor")
        present = decide_tags(self(pixel_values), thresholds)
        return [[name for name, keep in zip(self.tag_names, row.tolist()) if keep] for row in present]


def decide_tags(logits: torch.Tensor, thresholds: torch.Tensor | float) -> torch.Tensor:
    """logits (B, num_tags) -> bool (B, num_tags): sigmoid(logit) > threshold (strictly, as RAM)."""
    thresholds = torch.as_tensor(thresholds, dtype=torch.float32, device=logits.device)
    if thresholds.dim() > 1 or (thresholds.dim() == 1 and thresholds.shape[0] != logits.shape[-1]):
        raise RAMInputError(
            f"thresholds must be one float or one per tag ({logits.shape[-1]}), "
            f"got shape {tuple(thresholds.shape)}"
        )
    return torch.sigmoid(logits.float()) > thresholds
