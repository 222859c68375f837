"""`bubogpt_7b.pth` (joiner only: `model` -> `multimodal_joiner.*`) -> `MultimodalJoiner`.

Layout: `multimodal_joiner.modality_qformers.{audio,vision}.{Qformer.*,query_tokens}` and
`multimodal_joiner.modality_post_projectors.{audio,vision}.fc.{weight,bias}`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bubogpt.checkpoints.blip2 import convert_lavis_qformer
from bubogpt.checkpoints.common import LoadReport, assign_state_dict, load_torch_file
from bubogpt.modeling_qformer import MultimodalJoiner

PREFIX = "multimodal_joiner."


def convert_bubogpt_joiner(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    converted, ignored = {}, []
    for modality in MultimodalJoiner.MODALITIES:
        qformer, dropped = convert_lavis_qformer(state, prefix=f"{PREFIX}modality_qformers.{modality}.")
        converted.update({f"qformers.{modality}.{k}": v for k, v in qformer.items()})
        ignored += dropped
        projector = f"{PREFIX}modality_post_projectors.{modality}."
        converted.update(
            {f"projections.{modality}.{k[len(projector):]}": v for k, v in state.items() if k.startswith(projector)}
        )
    return converted, ignored


def load_bubogpt_joiner(joiner: MultimodalJoiner, path: str | Path) -> LoadReport:
    converted, ignored = convert_bubogpt_joiner(load_torch_file(path))
    return assign_state_dict(joiner, converted, f"BuboGPT joiner ({Path(path).name})", ignored=ignored)
