"""SAM (Segment Anything): one mask per box, built from `segment-anything`'s own modules.

    image (H, W, 3) uint8 --ResizeLongestSide(image_size), normalise, pad to a square-->
      image_encoder (ViT, windowed + a few global blocks, neck)  -> embedding (1, C, g, g), ONCE per image
    boxes (N, 4) pixel xyxy --same resize--> prompt_encoder -> sparse (N, 2, C), dense (N, C, g, g)
      mask_decoder (two-way transformer, multimask_output=False) -> low-res logits (N, 1, 4g, 4g)
      -> upsample, crop the padding, resize to (H, W) -> logits > 0
      -> small holes and islands removed (segment_anything.utils.amg.remove_small_regions)

`SamConfig` holds every size; `sam_vit_h/l/b()` equal the released checkpoints (what
segment-anything's `build_sam_vit_*` build) and `sam_tiny()` is this project's small one.
`load_sam(path)` reads a checkpoint in the released format (a bare state dict) safely
(`weights_only=True`, unlike segment-anything's own loader), infers the config from its shapes unless
one is given, and loads it strictly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.amg import remove_small_regions
from segment_anything.utils.transforms import ResizeLongestSide

from bubogpt.checkpoints.common import CheckpointMismatchError, assign_state_dict, load_torch_file

MIN_REGION_AREA = 400  # px, the reference's hole/island threshold ...
REFERENCE_AREA = 1024 * 1024  # ... for an image of SAM's input size; smaller images scale it down


class SegmenterInputError(ValueError):
    """An image or boxes the segmenter cannot use."""


@dataclass
class SamConfig:
    """Sizes of a SAM model; defaults are ViT-H (`sam_vit_h_4b8939.pth`)."""

    encoder_embed_dim: int = 1280
    encoder_depth: int = 32
    encoder_num_heads: int = 16
    encoder_global_attn_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def sam_vit_h() -> SamConfig:
    return SamConfig()


def sam_vit_l() -> SamConfig:
    return SamConfig(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                     encoder_global_attn_indexes=[5, 11, 17, 23])  # fmt: skip


def sam_vit_b() -> SamConfig:
    return SamConfig(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                     encoder_global_attn_indexes=[2, 5, 8, 11])  # fmt: skip


def sam_tiny() -> SamConfig:
    """256-px input, patch 8 (a 32 x 32 embedding), 4 blocks of width 64, a 64-wide decoder."""
    return SamConfig(
        encoder_embed_dim=64, encoder_depth=4, encoder_num_heads=2, encoder_global_attn_indexes=[1, 3],
        image_size=256, patch_size=8, window_size=8, prompt_embed_dim=64, mask_in_chans=8,
        decoder_mlp_dim=256, decoder_num_heads=4, iou_head_hidden_dim=64,
    )  # fmt: skip


SAM_PRESETS = {"vit_h": sam_vit_h, "vit_l": sam_vit_l, "vit_b": sam_vit_b, "tiny": sam_tiny}


def build_sam(config: SamConfig) -> Sam:
    """segment-anything's `_build_sam`, with every size taken from `config` (it fixes the image size,
    patch and decoder sizes); random weights."""
    embedding = config.embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=config.encoder_depth,
            embed_dim=config.encoder_embed_dim,
            img_size=config.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=config.encoder_num_heads,
            patch_size=config.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(config.encoder_global_attn_indexes),
            window_size=config.window_size,
            out_chans=config.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(embedding, embedding),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=config.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=config.prompt_embed_dim,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_num_heads,
            ),
            transformer_dim=config.prompt_embed_dim,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def _count(state: dict[str, torch.Tensor], prefix: str, suffix: str) -> int:
    count = 0
    while f"{prefix}{count}{suffix}" in state:
        count += 1
    return count


def infer_sam_config(state: dict[str, torch.Tensor]) -> SamConfig:
    """Every size of a SAM state dict from its shapes. The decoder's head count is in no shape: it
    is 8, as in every released SAM (pass a config for anything else)."""

    def tensor(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointMismatchError(f"checkpoint lacks {key}: not a SAM state dict?")
        return state[key]

    patch = tensor("image_encoder.patch_embed.proj.weight")  # (embed, 3, p, p)
    embed_dim, patch_size = patch.shape[0], patch.shape[-1]
    grid = tensor("image_encoder.pos_embed").shape[1]  # (1, g, g, embed)
    depth = _count(state, "image_encoder.blocks.", ".norm1.weight")
    if depth == 0:
        raise CheckpointMismatchError("checkpoint has no image_encoder.blocks.*: not a SAM state dict?")
    spans, head_dim = [], None
    for i in range(depth):
        rel_pos = tensor(f"image_encoder.blocks.{i}.attn.rel_pos_h")  # (2 * span - 1, head_dim)
        spans.append((rel_pos.shape[0] + 1) // 2)
        head_dim = rel_pos.shape[1]
    global_blocks = [i for i, span in enumerate(spans) if span == grid]
    windows = {span for span in spans if span != grid}
    mask_down = tensor("prompt_encoder.mask_downscaling.3.weight")  # (mask_in_chans, mask_in_chans // 4, 2, 2)
    return SamConfig(
        encoder_embed_dim=embed_dim,
        encoder_depth=depth,
        encoder_num_heads=embed_dim // head_dim,
        encoder_global_attn_indexes=global_blocks,
        image_size=grid * patch_size,
        patch_size=patch_size,
        window_size=windows.pop() if windows else SamConfig.window_size,
        prompt_embed_dim=tensor("image_encoder.neck.0.weight").shape[0],
        mask_in_chans=mask_down.shape[0],
        decoder_depth=_count(state, "mask_decoder.transformer.layers.", ".norm1.weight"),
        decoder_mlp_dim=tensor("mask_decoder.transformer.layers.0.mlp.lin1.weight").shape[0],
        decoder_num_heads=8,
        iou_head_depth=_count(state, "mask_decoder.iou_prediction_head.layers.", ".weight"),
        iou_head_hidden_dim=tensor("mask_decoder.iou_prediction_head.layers.0.weight").shape[0],
        num_multimask_outputs=tensor("mask_decoder.mask_tokens.weight").shape[0] - 1,
    )


def load_sam(checkpoint_path: str | Path, config: SamConfig | None = None) -> Sam:
    """A SAM checkpoint in the released format (`sam_vit_h_4b8939.pth`: a bare state dict), loaded
    strictly: no missing, unexpected or mis-shaped tensor."""
    state = load_torch_file(checkpoint_path)
    config = config or infer_sam_config(state)
    sam = build_sam(config)
    report = assign_state_dict(sam, state, f"SAM ({Path(checkpoint_path).name})")
    if report.unexpected:
        raise CheckpointMismatchError(f"{checkpoint_path}: tensors SAM has no place for: {report.unexpected[:10]}")
    return sam.eval()


def save_sam(sam: Sam, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """The released format: a bare state dict (optionally cast, e.g. to fp16 for a small asset)."""
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
             for k, v in sam.state_dict().items()}  # fmt: skip
    torch.save(state, path)


def save_sam_config(config: SamConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def read_sam_config(path: str | Path) -> SamConfig:
    return SamConfig(**json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------------------------------
# Inputs, shared by inference and training
# ---------------------------------------------------------------------------------------------------


class SafeResizeLongestSide(ResizeLongestSide):
    """segment-anything's resize, except that no side becomes 0: for an extreme aspect ratio
    (4000 x 1) its rounding makes the shorter side 0 pixels, which PIL refuses; here it stays >= 1.
    Every other size is the same as segment-anything's."""

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        newh, neww = ResizeLongestSide.get_preprocess_shape(oldh, oldw, long_side_length)
        return max(1, newh), max(1, neww)


def sam_input(sam: Sam, image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, S, S): resized so the longer side is S, normalised, padded
    (exactly what `SamPredictor.set_image` does)."""
    transform = SafeResizeLongestSide(sam.image_encoder.img_size)
    resized = torch.as_tensor(transform.apply_image(image), device=sam.device).permute(2, 0, 1)[None]
    return sam.preprocess(resized.float())


def sam_box_prompts(sam: Sam, boxes: np.ndarray, original_size: tuple[int, int]) -> torch.Tensor:
    """(N, 4) pixel xyxy of the original (H, W) image -> (N, 4) in the resized input's pixels."""
    transform = SafeResizeLongestSide(sam.image_encoder.img_size)
    return transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float32, device=sam.device), original_size)


def region_area_threshold(height: int, width: int, min_region_area: int = MIN_REGION_AREA) -> float:
    """`min_region_area` for an image of SAM's input size, scaled down by area for smaller images."""
    return min_region_area * min(1.0, height * width / REFERENCE_AREA)


def clean_mask(mask: np.ndarray, area: float) -> np.ndarray:
    """Fill holes and drop islands smaller than `area` pixels (a mask that is all small keeps its largest part)."""
    mask, _ = remove_small_regions(mask, area, mode="holes")
    mask, _ = remove_small_regions(mask, area, mode="islands")
    return mask


class SamSegmenter:
    """Masks for boxes; the image embedding is computed once per image and reused for all its boxes."""

    def __init__(self, sam: Sam, min_region_area: int = MIN_REGION_AREA):
        self.sam = sam.eval()
        self.min_region_area = min_region_area

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the resized image inside SAM's padded square input."""
        return SafeResizeLongestSide.get_preprocess_shape(height, width, self.sam.image_encoder.img_size)

    @torch.no_grad()
    def mask_logits(self, image: Image.Image | np.ndarray, boxes) -> torch.Tensor:
        """image (H, W, 3) uint8 RGB or a PIL image; boxes (N, 4) pixel xyxy -> (N, H, W) float logits."""
        pixels = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise SegmenterInputError(f"image must be (H, W, 3) uint8 RGB, got {pixels.shape} {pixels.dtype}")
        height, width = pixels.shape[:2]
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            return torch.zeros(0, height, width)
        if not np.isfinite(boxes).all():
            raise SegmenterInputError("boxes contain NaN or infinite coordinates")
        sam = self.sam
        embedding = sam.image_encoder(sam_input(sam, pixels))  # (1, C, g, g): once for all boxes
        sparse, dense = sam.prompt_encoder(points=None, boxes=sam_box_prompts(sam, boxes, (height, width)), masks=None)
        low_res, _ = sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )  # (N, 1, 4g, 4g)
        return sam.postprocess_masks(low_res, self.input_size(height, width), (height, width))[:, 0].float().cpu()

    def masks_from_logits(self, logits: torch.Tensor) -> np.ndarray:
        """(N, H, W) logits -> (N, H, W) bool: logits > SAM's threshold, small holes and islands removed."""
        height, width = logits.shape[1:]
        masks = (logits > self.sam.mask_threshold).numpy()
        area = region_area_threshold(height, width, self.min_region_area)
        return np.stack([clean_mask(m, area) for m in masks]) if len(masks) else masks

    def segment(self, image: Image.Image | np.ndarray, boxes) -> np.ndarray:
        """image (H, W, 3) uint8 RGB or a PIL image; boxes (N, 4) pixel xyxy -> (N, H, W) bool masks."""
        return self.masks_from_logits(self.mask_logits(image, boxes))
