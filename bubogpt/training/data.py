"""Batches of the recipe: which dataset each batch comes from (`RatioMixer`) and decoded rows ->
model inputs (`collate`, prompts by `bubogpt.training.prompts.row_prompt`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from bubogpt.conversation import Segment
from bubogpt.training.config import PROMPT_STYLES, SERVED_PROMPT_STYLE, TrainConfig, TrainConfigError
from bubogpt.training.prompts import CollateError, fixed_instruction, pick_instruction, row_modalities, row_prompt

# Modalities each dataset's rows carry; a stage mixing datasets of different modalities leaves some
# trainable modules without gradient in a step, which DDP must be told about.
DATASET_MODALITIES = {
    "wavcaps": ("audio",),
    "cc_sbu_align": ("vision",),
    "llava_instruct": ("vision",),
    "clotho": ("audio",),
    "vggss": ("audio", "vision"),
    "negative_pairs": ("audio", "vision"),
}


def mixes_modalities(config: TrainConfig) -> bool:
    """Does a step of this stage leave some trainable module without gradient (a clotho batch never
    reaches the vision projection)? Then DDP must look for unused parameters."""
    return len({DATASET_MODALITIES.get(name, ()) for name in config.datasets}) > 1


class RowStream(Protocol):
    """Endless batches of decoded rows of one dataset (e.g. `workflows/streams.py`). `state()` says
    where the stream stands (JSON-able); `restore(state)` continues exactly there, so that a resumed
    run reads the rows an uninterrupted one would have read."""

    def next_rows(self) -> list[dict[str, Any]]: ...

    def state(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any]) -> None: ...


class RatioMixer:
    """Chooses the dataset of each batch with probability proportional to its ratio.

    The choice depends only on (seed, step, micro-step), so every data-parallel worker picks the same
    dataset at the same step (their gradients then cover the same modules) and a resumed run makes
    the same choices as an uninterrupted one.
    """

    def __init__(self, ratios: Mapping[str, float], seed: int = 0):
        if not ratios or any(r <= 0 for r in ratios.values()):
            raise TrainConfigError(f"sample ratios must be positive, got {dict(ratios)}")
        self.names = sorted(ratios)
        weights = np.array([ratios[n] for n in self.names], dtype=np.float64)
        self.probabilities = weights / weights.sum()
        self.seed = seed

    def choose(self, step: int, micro_step: int = 0) -> str:
        rng = np.random.default_rng([self.seed, step, micro_step])
        return self.names[int(rng.choice(len(self.names), p=self.probabilities))]



@dataclass
class ModelBatch:
    """Inputs of `BuboGPT.forward`. Modality tensors are compact: one row per prompt with that slot."""

    prompts: list[list[Segment]]
    targets: list[str]
    image: torch.Tensor | None = None  # (n_image, 3, S, S)
    audio: torch.Tensor | None = None  # (n_audio, clips, 1, mels, frames)
    vision_tokens: torch.Tensor | None = None  # (n_image, T, vision_width)
    audio_tokens: torch.Tensor | None = None  # (n_audio, T, audio_width)
    datasets: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def to(self, device: torch.device | str) -> "ModelBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return dataclasses.replace(
            self,
            image=move(self.image),
            audio=move(self.audio),
            vision_tokens=move(self.vision_tokens),
            audio_tokens=move(self.audio_tokens),
        )

    def model_inputs(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "targets": self.targets,
            "image": self.image,
            "audio": self.audio,
            "vision_tokens": self.vision_tokens,
            "audio_tokens": self.audio_tokens,
        }




def _stack(tensors: list[torch.Tensor], column: str) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise CollateError(f"{column}: rows of different shapes {sorted(shapes)} in one batch")
    return torch.stack(tensors)


def _as_tensor(value: Any) -> torch.Tensor | None:
    if value is None:
        return None
    return value.float() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value), dtype=torch.float32)


def collate(
    rows: Sequence[Mapping[str, Any]],
    prompt_style: str,
    rng: np.random.Generator | None,
    use_precomputed_tokens: bool = False,
    instruction_for: Callable[[Mapping[str, Any]], str] | None = None,
) -> ModelBatch:
    """Decoded rows -> `ModelBatch`.

    A row holds `dataset`, `instruction`, `answer` and tensors (or None) `pixel_values` (3, S, S),
    `fbank` (clips, 1, mels, frames) and optionally `vision_tokens` / `audio_tokens` (T, D).
    Each row's prompt is `row_prompt` in `prompt_style`. The instruction is `instruction_for(row)`,
    by default one picked at random with `rng` (training).
    """
    if not rows:
        raise CollateError("empty batch")
    if prompt_style not in PROMPT_STYLES:
        raise CollateError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")

    def instruction(row: Mapping[str, Any]) -> str:
        if instruction_for is not None:
            return instruction_for(row)
        return pick_instruction(row["dataset"], row.get("instruction") or "", rng)

    prompts, targets, datasets = [], [], []
    media: dict[str, list[torch.Tensor]] = {"image": [], "audio": [], "vision_tokens": [], "audio_tokens": []}
    for row in rows:
        datasets.append(row["dataset"])
        # The caption style asks nothing: no instruction is drawn (the rng stays where it is).
        prompts.append(row_prompt(row, prompt_style, instruction(row) if prompt_style != "caption" else ""))
        targets.append(row["answer"])
        modalities = row_modalities(row)
        if "vision" in modalities:
            media["image"].append(_as_tensor(row.get("pixel_values")))
            media["vision_tokens"].append(_as_tensor(row.get("vision_tokens")))
        if "audio" in modalities:
            media["audio"].append(_as_tensor(row.get("fbank")))
            media["audio_tokens"].append(_as_tensor(row.get("audio_tokens")))
    batch = ModelBatch(prompts, targets, datasets=datasets)
    for raw, tokens in (("image", "vision_tokens"), ("audio", "audio_tokens")):
        if not media[raw]:
            continue
        if use_precomputed_tokens and all(t is not None for t in media[tokens]):
            setattr(batch, tokens, _stack(media[tokens], tokens))
        elif all(t is not None for t in media[raw]):
            setattr(batch, raw, _stack(media[raw], raw))
        else:
            raise CollateError(f"some rows have {tokens} but no {raw}, and precomputed tokens are not used")
    return batch


def generation_batch(rows: Sequence[Mapping[str, Any]], prompt_style: str = SERVED_PROMPT_STYLE) -> ModelBatch:
    """Prompts to generate from (evaluation, sample generations): every row asked the fixed way of
    its dataset (`fixed_instruction`)."""
    return collate(rows, prompt_style, None, instruction_for=fixed_instruction)


def count_target_tokens(labels: torch.Tensor, ignore_index: int = -100) -> int:
    """Supervised tokens in a batch's labels (B, T)."""
    return int((labels != ignore_index).sum())
