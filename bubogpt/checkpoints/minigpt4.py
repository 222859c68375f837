"""MiniGPT-4's `prerained_minigpt4_7b.pth` (sic): `llama_proj` -> the vision projection."""

from __future__ import annotations

from pathlib import Path

from bubogpt.checkpoints.common import LoadReport, assign_state_dict, load_torch_file
from bubogpt.modeling_qformer import ModalityProjection

KEY_TABLE = {"llama_proj.weight": "fc.weight", "llama_proj.bias": "fc.bias"}


def load_minigpt4_projection(projection: ModalityProjection, path: str | Path) -> LoadReport:
    state = load_torch_file(path)
    converted = {KEY_TABLE[k]: v for k, v in state.items() if k in KEY_TABLE}
    ignored = [k for k in state if k not in KEY_TABLE]
    return assign_state_dict(projection, converted, f"MiniGPT-4 llama_proj ({Path(path).name})", ignored=ignored)
