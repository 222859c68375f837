"""`eva_vit_g.pth` (raw EVA ViT-g state dict, BLIP-2's `visual_encoder`) -> `EvaVisionEncoder`.

`ln_vision` is not in this file: it comes from the BLIP-2 checkpoint (`blip2.py`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from bubogpt.checkpoints.common import LoadReport, assign_state_dict, load_torch_file
from bubogpt.modeling_vision import EvaVisionEncoder, interpolate_pos_embed

IGNORED_PREFIXES = ("norm.", "head.", "fc_norm.", "lm_head.")  # EVA parts BLIP-2 drops


def convert_eva_vit(
    state: dict[str, torch.Tensor], num_patches: int, prefix: str = ""
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our names equal EVA's; the position embedding is resized if the image size differs.

    `prefix` = "visual_encoder." reads the ViT out of a full BLIP-2 / MiniGPT-4 checkpoint.
    """
    converted, ignored = {}, []
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name.startswith(IGNORED_PREFIXES) or name.endswith("relative_position_index"):
            ignored.append(key)
            continue
        converted[name] = value
    if "pos_embed" in converted:
        converted["pos_embed"] = interpolate_pos_embed(converted["pos_embed"], num_patches)
    return converted, ignored


def load_eva_vit(encoder: EvaVisionEncoder, path: str | Path) -> LoadReport:
    converted, ignored = convert_eva_vit(load_torch_file(path), encoder.config.num_patches)
    return assign_state_dict(
        encoder, converted, f"EVA ViT ({Path(path).name})", ignored=ignored,
        allow_missing=("ln_vision.",),
    )
