"""`imagebind_huge.pth` (a raw state dict of all ImageBind modalities) -> `ImageBindAudioEncoder`."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from bubogpt.checkpoints.common import LoadReport, assign_state_dict, load_torch_file
from bubogpt.modeling_audio import ImageBindAudioEncoder

# ImageBind name -> ours. The stem conv is `proj.0` in ImageBind's nn.Sequential; some exports
# flatten it to `proj`; both are accepted.
KEY_TABLE = {
    "modality_preprocessors.audio.rgbt_stem.proj.0.weight": "patch_embed.weight",
    "modality_preprocessors.audio.rgbt_stem.proj.weight": "patch_embed.weight",
    "modality_preprocessors.audio.rgbt_stem.norm_layer.weight": "patch_norm.weight",
    "modality_preprocessors.audio.rgbt_stem.norm_layer.bias": "patch_norm.bias",
    "modality_preprocessors.audio.cls_token": "cls_token",
    "modality_preprocessors.audio.pos_embedding_helper.pos_embed": "pos_embed",
    "modality_postprocessors.audio.1.log_logit_scale": "log_logit_scale",
}
TRUNK_PREFIX = "modality_trunks.audio."  # blocks.N.{attn,norm_1,norm_2,mlp}.* keep their names
# Audio keys BuboGPT does not use: the head (LayerNorm + CLS select + Linear to 1024).
IGNORED_PREFIXES = ("modality_heads.audio.",)


# `imagebind_huge.pth` holds vision, text, depth, thermal and IMU too: known, not used.
OTHER_MODALITIES = re.compile(r"^modality_(preprocessors|trunks|heads|postprocessors)\.(?!audio\.)")


def convert_imagebind_audio(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Returns (our state dict, ignored source keys (the audio head, the other modalities), unexpected
    source keys (anything else; skipped))."""
    converted, ignored, unexpected = {}, [], []
    for key, value in state.items():
        if key in KEY_TABLE:
            converted[KEY_TABLE[key]] = value
        elif key.startswith(TRUNK_PREFIX):
            converted[key[len(TRUNK_PREFIX):]] = value
        elif key.startswith(IGNORED_PREFIXES) or OTHER_MODALITIES.match(key):
            ignored.append(key)
        else:
            unexpected.append(key)
    if "log_logit_scale" in converted:
        converted["log_logit_scale"] = converted["log_logit_scale"].reshape(())
    return converted, ignored, unexpected


def load_imagebind_audio(encoder: ImageBindAudioEncoder, path: str | Path) -> LoadReport:
    converted, ignored, unexpected = convert_imagebind_audio(load_torch_file(path))
    return assign_state_dict(encoder, converted, f"ImageBind audio ({Path(path).name})", ignored=ignored,
                             unexpected=unexpected)  # fmt: skip
