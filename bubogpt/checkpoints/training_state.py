"""Training checkpoints: the whole model (rebuildable on its own) plus the optimiser and the step.

    CKPT/model/               `save_model` layout: bubogpt_config.json, model.safetensors, llm/
                              (+ llm_lora/ with the peft adapter when LoRA is on)
    CKPT/optimizer.pt         optimiser state (rank 0; read back with `weights_only=True`)
    CKPT/train_state.json     {"stage", "step", "train_config", "loss_history"}
    CKPT/streams/rank<N>.json where each data-parallel rank's batch streams stand (every rank writes
                              its own: {"world", "streams": {dataset: stream state}}), so that a
                              resumed run reads the rows an uninterrupted one would have read

Unlike the reference, which kept only the trainable parameters (so its stage-2 file lacked the audio
Q-Former), a checkpoint holds every weight of the encoders and the joiner, and the LLM whenever it is
not an external, frozen directory (a 7B Vicuna is referenced, not copied).

Writes are atomic (`bubogpt.atomic`): everything goes to a hidden temporary sibling folder that is
renamed into place at the end, so a write killed half-way leaves the previous checkpoints untouched
and no half-written folder under a checkpoint name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bubogpt.atomic import atomic_directory
from bubogpt.checkpoints.native import CONFIG_FILE, WEIGHTS_FILE, load_model, save_model
from bubogpt.modeling_bubogpt import BuboGPT

MODEL_DIR = "model"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "train_state.json"
LORA_DIR = "llm_lora"
STREAMS_DIR = "streams"


class CheckpointError(ValueError):
    """A training checkpoint folder that is missing files or cannot be read."""


@dataclass
class TrainState:
    stage: str
    step: int  # optimiser steps done
    train_config: dict[str, Any] = field(default_factory=dict)
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)  # every other file of the folder -> size

    def to_json(self) -> str:
        return json.dumps(
            {"stage": self.stage, "step": self.step, "train_config": self.train_config,
             "loss_history": self.loss_history, "files": self.files},
            indent=1,
        )  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        data = json.loads(text)
        return cls(data["stage"], int(data["step"]), data.get("train_config", {}),
                   [tuple(x) for x in data.get("loss_history", [])], data.get("files", {}))  # fmt: skip


def list_files(directory: Path) -> dict[str, int]:
    """{relative path: size} of every file under `directory`."""
    return {p.relative_to(directory).as_posix(): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def _is_peft(llm: nn.Module) -> bool:
    return hasattr(llm, "peft_config")


def _save_base_llm(peft_llm: nn.Module, tokenizer, directory: Path) -> None:
    """The LLM under a peft wrapper, without its adapters, in Hugging Face format."""
    base = peft_llm.get_base_model()
    state = {
        key.replace(".base_layer.", "."): value
        for key, value in base.state_dict().items()
        if "lora_" not in key
    }
    clean = type(base)(base.config)
    clean.load_state_dict(state)
    clean.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def write_model(model: BuboGPT, directory: str | Path, include_llm: bool) -> Path:
    """`save_model` that leaves the model untouched when its LLM carries LoRA adapters
    (base weights in llm/, adapter in llm_lora/)."""
    directory = Path(directory)
    if not _is_peft(model.llm):
        return save_model(model, directory, include_llm=include_llm)
    save_model(model, directory, include_llm=False)
    if include_llm:
        _save_base_llm(model.llm, model.tokenizer, directory / "llm")
        config = json.loads((directory / CONFIG_FILE).read_text())
        config["llm"]["path"] = None  # llm/ beside the config
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    model.llm.save_pretrained(directory / LORA_DIR)
    return directory


def read_model(directory: str | Path, trainable_lora: bool = True) -> BuboGPT:
    """Rebuild a model written by `write_model` (LoRA adapter re-attached when present)."""
    directory = Path(directory)
    model = load_model(directory)
    if (directory / LORA_DIR).is_dir():
        from peft import PeftModel

        model.llm = PeftModel.from_pretrained(model.llm, str(directory / LORA_DIR), is_trainable=trainable_lora)
    return model


def save_checkpoint(
    directory: str | Path,
    model: BuboGPT,
    state: TrainState,
    optimizer: torch.optim.Optimizer | None = None,
    include_llm: bool = True,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (`bubogpt.atomic`). `extra`: {file name: bytes} written beside it."""
    with atomic_directory(directory) as staging:
        write_model(model, staging / MODEL_DIR, include_llm=include_llm)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), staging / OPTIMIZER_FILE)
        write_extra(staging, extra or {})
        write_state(staging, state)
    return Path(directory)


def write_extra(directory: Path, extra: dict[str, bytes]) -> None:
    """{relative file name: bytes} into `directory`."""
    for name, data in extra.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)


def stream_positions_file(rank: int) -> str:
    """Where rank `rank` keeps its streams' positions in a checkpoint folder."""
    return f"{STREAMS_DIR}/rank{rank}.json"


def stream_positions(rank: int, world: int, states: dict[str, dict[str, Any]]) -> dict[str, bytes]:
    """A rank's stream states as the `extra` files of its part of a checkpoint."""
    return {stream_positions_file(rank): json.dumps({"world": world, "streams": states}).encode()}


def read_stream_positions(directory: str | Path, rank: int, world: int) -> dict[str, dict[str, Any]] | None:
    """{dataset: stream state} that rank `rank` saved in a checkpoint, or None when it saved none or
    the checkpoint was written by a different number of ranks (its positions then mean nothing here)."""
    path = Path(directory) / stream_positions_file(rank)
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["streams"] if saved.get("world") == world else None


def write_state(directory: Path, state: TrainState) -> None:
    """The state file goes last and lists every other file with its size: a copy of the folder (Ray's
    upload to its storage is file by file) is complete only when all of them arrived."""
    state.files = list_files(directory)
    (directory / STATE_FILE).write_text(state.to_json())


def is_complete(directory: str | Path) -> bool:
    """The state file is there and every file it lists has its recorded size."""
    directory = Path(directory)
    try:
        state = TrainState.from_json((directory / STATE_FILE).read_text())
    except (OSError, ValueError, KeyError):
        return False
    return listing_is_complete(state, list_files(directory))


def listing_is_complete(state: TrainState, files: dict[str, int]) -> bool:
    """Does a checkpoint folder holding `files` ({relative path: size}, wherever it is stored) have
    the model's weights and every file its state lists, at its recorded size?"""
    weights = f"{MODEL_DIR}/{WEIGHTS_FILE}"
    return weights in files and all(files.get(name) == size for name, size in state.files.items())


def read_state(directory: str | Path) -> TrainState:
    directory = Path(directory)
    if not is_complete(directory):
        raise CheckpointError(f"{directory} is not a complete training checkpoint (missing or partial files)")
    return TrainState.from_json((directory / STATE_FILE).read_text())


def load_optimizer_state(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / OPTIMIZER_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint folder under `root` with the highest step (partial writes ignored)."""
    root = Path(root)
    if not root.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for candidate in root.iterdir():
        if candidate.name.startswith(".") or not candidate.is_dir() or not is_complete(candidate):
            continue
        step = read_state(candidate).step
        if best is None or step > best[0]:
            best = (step, candidate)
    return best[1] if best else None
