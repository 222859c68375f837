"""This project's own model directory: everything needed to rebuild the model, in safetensors.

    DIR/bubogpt_config.json   BuboGPTConfig
    DIR/model.safetensors     encoders + joiner (all of them: a stage-2 export keeps the audio Q-Former)
    DIR/llm/                  the language model and tokenizer (`save_pretrained`), unless the config
                              points at an external LLM directory (a 7B Vicuna is not copied)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bubogpt.checkpoints.common import CheckpointMismatchError, LoadReport, assign_state_dict
from bubogpt.config import BuboGPTConfig
from bubogpt.llm import load_tokenizer
from bubogpt.modeling_bubogpt import BuboGPT

CONFIG_FILE = "bubogpt_config.json"
WEIGHTS_FILE = "model.safetensors"
LLM_DIR = "llm"


def save_model(model: BuboGPT, directory: str | Path, include_llm: bool | None = None) -> Path:
    """Write `model` to `directory` (created). `include_llm` defaults to: when it has no external path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    include_llm = (not model.config.llm.path) if include_llm is None else include_llm
    weights = {
        name: tensor.detach().contiguous().cpu()
        for name, tensor in model.state_dict().items()
        if not name.startswith("llm.")
    }
    save_file(weights, directory / WEIGHTS_FILE, metadata={"format": "bubogpt", "preset": model.config.preset})
    config = BuboGPTConfig.from_dict(model.config.to_dict())
    if include_llm:
        llm = model.llm.merge_and_unload() if hasattr(model.llm, "merge_and_unload") else model.llm
        llm.save_pretrained(directory / LLM_DIR, safe_serialization=True)
        model.tokenizer.save_pretrained(directory / LLM_DIR)
        config.llm.path = None  # resolved relative to the directory on load
    config.save(directory / CONFIG_FILE)
    return directory


def load_model(directory: str | Path, dtype: torch.dtype | None = None) -> BuboGPT:
    """Rebuild a model saved by `save_model`; shapes are checked key by key."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a BuboGPT model directory (no {CONFIG_FILE})")
    config = BuboGPTConfig.load(config_path)
    llm_path = config.llm.path or str(directory / LLM_DIR)
    tokenizer = load_tokenizer(llm_path)
    config.llm.path = llm_path
    model = BuboGPT.build(config, tokenizer, dtype=dtype)
    report = load_weights(model, directory / WEIGHTS_FILE)
    if report.unexpected:
        raise CheckpointMismatchError(f"{directory / WEIGHTS_FILE}: unexpected keys {report.unexpected[:10]}")
    return model.eval()


def load_weights(model: BuboGPT, path: str | Path) -> LoadReport:
    state = load_file(str(path))
    return assign_state_dict(model, state, f"BuboGPT weights ({Path(path).name})", allow_missing=("llm.",))


def read_config(directory: str | Path) -> dict:
    return json.loads((Path(directory) / CONFIG_FILE).read_text())
