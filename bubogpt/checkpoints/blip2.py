"""`blip2_pretrained_flant5xxl.pth` -> the vision Q-Former, its query tokens and `ln_vision`.

Also holds the LAVIS Q-Former key table, which `bubogpt_joiner.py` reuses.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from bubogpt.checkpoints.common import LoadReport, assign_state_dict, load_torch_file
from bubogpt.modeling_qformer import QFormer
from bubogpt.modeling_vision import EvaVisionEncoder

# LAVIS (BERT) names -> ours, applied in order to `Qformer.bert.*` keys.
QFORMER_RENAMES = [
    ("embeddings.LayerNorm.", "layernorm."),
    ("encoder.layer.", "layers."),
    (".attention.self.", ".self_attn."),
    (".attention.output.dense.", ".self_attn.out."),
    (".attention.output.LayerNorm.", ".self_attn.norm."),
    (".crossattention.self.", ".cross_attn."),
    (".crossattention.output.dense.", ".cross_attn.out."),
    (".crossattention.output.LayerNorm.", ".cross_attn.norm."),
    (".intermediate_query.dense.", ".ffn.fc1."),
    (".output_query.dense.", ".ffn.fc2."),
    (".output_query.LayerNorm.", ".ffn.norm."),
]
# The text side of the Q-Former: BuboGPT never feeds it text.
QFORMER_TEXT_SIDE = re.compile(
    r"^(cls\.|bert\.embeddings\.(word_embeddings|position_embeddings|position_ids)"
    r"|bert\.encoder\.layer\.\d+\.(intermediate|output)\.)"
)
LN_VISION = "ln_vision."


def convert_lavis_qformer(
    state: dict[str, torch.Tensor], prefix: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`{prefix}Qformer.bert.*` + `{prefix}query_tokens` -> `QFormer` names. Returns (state, ignored)."""
    converted, ignored = {}, []
    if f"{prefix}query_tokens" in state:
        converted["query_tokens"] = state[f"{prefix}query_tokens"]
    qformer_prefix = f"{prefix}Qformer."
    for key, value in state.items():
        if not key.startswith(qformer_prefix):
            continue
        name = key[len(qformer_prefix):]
        if QFORMER_TEXT_SIDE.match(name):
            ignored.append(key)
            continue
        name = name.removeprefix("bert.")
        for old, new in QFORMER_RENAMES:
            name = name.replace(old, new)
        converted[name] = value
    return converted, ignored


def convert_blip2(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """A BLIP-2 state dict -> (vision Q-Former state, `ln_vision` state, ignored keys).

    Everything else in a BLIP-2 file (the ViT itself, ITC/ITM heads, t5_proj, the Q-Former's text
    side) is listed as ignored: BuboGPT takes its ViT from `eva_vit_g.pth`."""
    qformer, ignored = convert_lavis_qformer(state, prefix="")
    ln_vision = {k[len(LN_VISION):]: v for k, v in state.items() if k.startswith(LN_VISION)}
    used = set(ignored) | {k for k in state if k.startswith(("Qformer.", "query_tokens", LN_VISION))}
    ignored += [k for k in state if k not in used]
    return qformer, ln_vision, ignored


def load_blip2_vision_qformer(
    qformer: QFormer, vision_encoder: EvaVisionEncoder | None, path: str | Path
) -> tuple[LoadReport, LoadReport | None]:
    """Load the vision Q-Former and (with `vision_encoder`) its `ln_vision` from a BLIP-2 file."""
    name = Path(path).name
    converted, ln_vision, ignored = convert_blip2(load_torch_file(path))
    qformer_report = assign_state_dict(qformer, converted, f"BLIP-2 Q-Former ({name})", ignored=ignored)
    if vision_encoder is None:
        return qformer_report, None
    ln_report = assign_state_dict(vision_encoder.ln_vision, ln_vision, f"BLIP-2 ln_vision ({name})")
    return qformer_report, ln_report
