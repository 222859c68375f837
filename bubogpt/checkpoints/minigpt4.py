"""MiniGPT-4's `prerained_minigpt4_7b.pth` (sic): `llama_proj` -> the vision projection."""

from __future__ import annotations

from pathlib import Path

import torch

from bubogpt.checkpoints.common import LoadReport, assign_state_dict, load_torch_file
from bubogpt.modeling_qformer import ModalityProjection

KEY_TABLE = {"llama_proj.weight": "fc.weight", "llama_proj.bias": "fc.bias"}


def convert_minigpt4(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the projection's state, ignored keys)."""
    converted = {KEY_TABLE[k]: v for k, v in state.items() if k in KEY_TABLE}
    return converted, [k for k in state if k not in KEY_TABLE]


def load_minigpt4_projection(projection: ModalityProjection, path: str | Path) -> LoadReport:
    converted, ignored = convert_minigpt4(load_torch_file(path))
    return assign_state_dict(projection, converted, f"MiniGPT-4 llama_proj ({Path(path).name})", ignored=ignored)
