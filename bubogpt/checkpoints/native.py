"""This project's own model directory: everything needed to rebuild the model, in safetensors.

    DIR/bubogpt_config.json   BuboGPTConfig
    DIR/model.safetensors     encoders + joiner (all of them: a stage-2 export keeps the audio Q-Former)
    DIR/llm/                  the language model and tokenizer (`save_pretrained`), unless the config
                              points at an external LLM directory (a 7B Vicuna is not copied)

`bubogpt convert` (bubogpt/convert.py) writes the same layout from the released checkpoints.
Loading reads the weights tensor by tensor into a model built in its final dtypes (the frozen parts in
`frozen_dtype`, see bubogpt/modeling_bubogpt.py), so the file is never held in memory beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from bubogpt.checkpoints.common import CheckpointMismatchError, LoadReport, check_state_shapes
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


def load_model(directory: str | Path, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> BuboGPT:
    """Rebuild a model saved by `save_model` (or written by `bubogpt convert`); shapes are checked
    key by key. The LLM and the encoders come in `dtype`, default the config's `frozen_dtype` for
    `device` (bfloat16 for 7b/13b on a GPU, float32 on the CPU); the joiner in float32."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a BuboGPT model directory (no {CONFIG_FILE})")
    config = BuboGPTConfig.load(config_path)
    llm_path = config.llm.path or str(directory / LLM_DIR)
    if not Path(llm_path).is_dir():
        raise FileNotFoundError(f"{config_path}: the language model directory {llm_path} does not exist")
    tokenizer = load_tokenizer(llm_path)
    config.llm.path = llm_path
    model = BuboGPT.build(config, tokenizer, dtype=dtype, device=device)
    report = load_weights(model, directory / WEIGHTS_FILE)
    if report.unexpected:
        raise CheckpointMismatchError(f"{directory / WEIGHTS_FILE}: unexpected keys {report.unexpected[:10]}")
    return model.eval()


def load_weights(model: nn.Module, path: str | Path, prefix: str = "", source: str | None = None) -> LoadReport:
    """Copy the tensors of a safetensors file whose names start with `prefix` (removed) into `model`,
    one at a time, each converted to the dtype of the parameter it fills. Every model key but the
    LLM's must be in the file, with its shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model weights not found: {path}")
    source = source or f"BuboGPT weights ({path.name}{', ' + prefix[:-1] if prefix else ''})"
    own = model.state_dict()
    with safe_open(str(path), framework="pt") as tensors:
        names = {key[len(prefix):]: key for key in tensors.keys() if key.startswith(prefix)}
        shapes = {name: torch.empty(tensors.get_slice(key).get_shape(), device="meta") for name, key in names.items()}
        check_state_shapes(own, shapes, source, allow_missing=("llm.",))
        report = LoadReport(source, unexpected=sorted(n for n in names if n not in own))
        report.missing = sorted(k for k in own if k not in names)
        with torch.no_grad():
            for name, key in names.items():
                if name in own:
                    own[name].copy_(tensors.get_tensor(key))
                    report.loaded.append(name)
    return report


def read_config(directory: str | Path) -> dict:
    return json.loads((Path(directory) / CONFIG_FILE).read_text())
