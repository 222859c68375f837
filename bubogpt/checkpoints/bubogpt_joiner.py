"""`bubogpt_7b.pth` (joiner only: `model` -> `multimodal_joiner.*`) -> `MultimodalJoiner`.

Layout: `multimodal_joiner.modality_qformers.{audio,vision}.{Qformer.*,query_tokens}` and
`multimodal_joiner.modality_post_projectors.{audio,vision}.fc.{weight,bias}`.

The released file holds no vision Q-Former: the original's eval config (`use_blip_vision: True`,
eval_configs/mmgpt4_eval.yaml:16) builds it from BLIP-2 (`replace_joiner_vision`,
imagebind/models/image_bind.py:654-664) and then loads the file with `strict=False`
(bubogpt/models/mm_gpt4.py:300-307). So a file without `modality_qformers.vision.*` takes the vision
Q-Former from BLIP-2; a file that has one (a re-export) uses its own. A file without the vision
projection (a stage-1 checkpoint: trainable parameters only) takes it from MiniGPT-4's `llama_proj`,
as the original's stage-2 config does (`proj_model`, train_configs/mmgpt4_stage2_mm.yaml:16); the
file's own projection wins when it has one, as the original loads the file last.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bubogpt.checkpoints.blip2 import convert_blip2, convert_lavis_qformer
from bubogpt.checkpoints.common import CheckpointMismatchError, LoadReport, assign_state_dict, load_torch_file
from bubogpt.checkpoints.minigpt4 import convert_minigpt4
from bubogpt.modeling_qformer import MultimodalJoiner

PREFIX = "multimodal_joiner."
VISION_QFORMER = "qformers.vision."
VISION_PROJECTION = "projections.vision."


def convert_bubogpt_joiner(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """-> (joiner state in our names, ignored keys (the Q-Formers' text side), unexpected keys (any
    key outside the Q-Formers and projections, e.g. a full-model export's LLM; skipped))."""
    converted, ignored, used = {}, [], set()
    for modality in MultimodalJoiner.MODALITIES:
        qformer_prefix = f"{PREFIX}modality_qformers.{modality}."
        qformer, dropped = convert_lavis_qformer(state, prefix=qformer_prefix)
        converted.update({f"qformers.{modality}.{k}": v for k, v in qformer.items()})
        ignored += dropped
        projector = f"{PREFIX}modality_post_projectors.{modality}."
        converted.update(
            {f"projections.{modality}.{k[len(projector):]}": v for k, v in state.items() if k.startswith(projector)}
        )
        used |= {k for k in state if k.startswith((qformer_prefix, projector))}
    unexpected = sorted(k for k in state if k not in used)
    return converted, ignored, unexpected


def complete_joiner_state(
    converted: dict[str, torch.Tensor],
    name: str,
    blip2: tuple[dict[str, torch.Tensor], str] | None = None,
    minigpt4: tuple[dict[str, torch.Tensor], str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Fill a BuboGPT joiner state's missing vision parts as the original does.

    `blip2` / `minigpt4`: (raw state dict, file name) or None. Returns (complete state, the file each
    part came from, the ignored keys of the files used). Raises when a vision part is missing and the
    file that supplies it was not given."""
    state, ignored = dict(converted), []
    origins = {part: name for part in ("audio Q-Former", "audio projection", "vision Q-Former", "vision projection")}
    if not any(k.startswith(VISION_QFORMER) for k in state):
        if blip2 is None:
            raise CheckpointMismatchError(
                f"{name} holds no vision Q-Former (the released layout: the original builds it from BLIP-2); "
                "give the BLIP-2 checkpoint (blip2_pretrained_flant5xxl.pth) too"
            )
        qformer, _, dropped = convert_blip2(blip2[0])
        state.update({VISION_QFORMER + k: v for k, v in qformer.items()})
        ignored += dropped
        origins["vision Q-Former"] = blip2[1]
    if not any(k.startswith(VISION_PROJECTION) for k in state):
        if minigpt4 is None:
            raise CheckpointMismatchError(
                f"{name} holds no vision projection (a stage-1 checkpoint?); give MiniGPT-4's "
                "prerained_minigpt4_7b.pth (llama_proj) too"
            )
        projection, dropped = convert_minigpt4(minigpt4[0])
        state.update({VISION_PROJECTION + k: v for k, v in projection.items()})
        ignored += dropped
        origins["vision projection"] = minigpt4[1]
    return state, origins, ignored


def describe_origins(origins: dict[str, str]) -> str:
    """{"vision Q-Former": "blip2.pth", ...} -> "bubogpt.pth + vision Q-Former from blip2.pth"."""
    main = origins["audio Q-Former"]
    return " + ".join([main] + [f"{part} from {file}" for part, file in origins.items() if file != main])


def load_bubogpt_joiner(
    joiner: MultimodalJoiner,
    path: str | Path,
    blip2: str | Path | None = None,
    minigpt4: str | Path | None = None,
) -> LoadReport:
    """Load a BuboGPT joiner file; its missing vision parts come from `blip2` / `minigpt4` (read only
    when needed). Missing or mis-shaped keys raise, naming the files, the key and the shapes."""
    converted, ignored, unexpected = convert_bubogpt_joiner(load_torch_file(path))
    needs_blip2 = not any(k.startswith(VISION_QFORMER) for k in converted)
    needs_minigpt4 = not any(k.startswith(VISION_PROJECTION) for k in converted)
    state, origins, extra_ignored = complete_joiner_state(
        converted,
        Path(path).name,
        blip2=(load_torch_file(blip2), Path(blip2).name) if blip2 is not None and needs_blip2 else None,
        minigpt4=(load_torch_file(minigpt4), Path(minigpt4).name) if minigpt4 is not None and needs_minigpt4 else None,
    )
    return assign_state_dict(
        joiner, state, f"BuboGPT joiner ({describe_origins(origins)})", ignored=ignored + extra_ignored,
        unexpected=unexpected,
    )
