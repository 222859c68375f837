"""The part of a training step that depends on how the model is distributed, behind one small
interface: `TorchStepper` for a plain or DDP-wrapped model (here), `DeepSpeedStepper` for a DeepSpeed
engine (`workflows/deepspeed_stepper.py`: it needs deepspeed itself). The recipe
(`bubogpt/training/recipe.py`) sees only `Stepper`.

Per optimiser step the recipe calls, for each of the `grad_accum_steps` micro-batches,

    with stepper.micro_batch(last), autocast():
        output = stepper.model(**inputs)
    stepper.backward(output.loss)

and then `stepper.step()`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from bubogpt.atomic import atomic_directory
from bubogpt.checkpoints.training_state import TrainState, save_checkpoint, write_extra


@dataclass
class Resume:
    """Where a stage continues from: the checkpoint's state, the optimiser's (a state dict) or the
    engine's own checkpoint folder (DeepSpeed partitions), and this rank's streams' positions
    ({dataset: state}, `read_stream_positions`; None: the streams start afresh)."""

    state: TrainState
    optimizer: dict[str, Any] | None = None
    engine_dir: Path | None = None
    streams: dict[str, dict[str, Any]] | None = None


class Stepper(Protocol):
    model: nn.Module  # what the forward pass calls: the (wrapped) model or the engine

    def micro_batch(self, last: bool) -> AbstractContextManager:
        """Around each micro-batch's forward pass: no gradient sync before the last one."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None:
        """After the last micro-batch: clip, optimiser step, zero the gradients, schedule step."""

    def lr(self) -> float: ...

    def restore(self, resume: Resume) -> None:
        """Continue the optimiser and schedule from a checkpoint."""

    def save(self, directory: Path, model: nn.Module, state: TrainState, include_llm: bool, extra: dict[str, bytes]) -> None:
        """Write this rank's part of a checkpoint folder atomically: what the stepper keeps, plus
        `extra` ({relative name: bytes}, e.g. the rank's stream positions)."""


class TorchStepper:
    """A plain model, or one wrapped in `DistributedDataParallel` (by the launcher, e.g. Ray Train's
    `prepare_model`). fp16 on GPU scales the loss (`GradScaler`)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 grad_accum_steps: int = 1, grad_clip: float | None = None, rank: int = 0,
                 scaler: torch.amp.GradScaler | None = None):  # fmt: skip
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_accum_steps, self.grad_clip, self.rank, self.scaler = grad_accum_steps, grad_clip, rank, scaler

    def micro_batch(self, last: bool) -> AbstractContextManager:
        no_sync = getattr(self.model, "no_sync", None)  # DDP only
        return nullcontext() if last or no_sync is None else no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        scaled = loss / self.grad_accum_steps
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()

    def step(self) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip:
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(trainable, self.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def restore(self, resume: Resume) -> None:
        if resume.optimizer is not None:
            self.optimizer.load_state_dict(resume.optimizer)
        for _ in range(resume.state.step):
            self.scheduler.step()  # LambdaLR: continue where the checkpoint left off

    def save(self, directory: Path, model: nn.Module, state: TrainState, include_llm: bool, extra: dict[str, bytes]) -> None:
        if self.rank == 0:  # DDP keeps every rank's copy the same: one writes it
            save_checkpoint(directory, model, state, self.optimizer, include_llm=include_llm, extra=extra)
        else:
            with atomic_directory(directory) as staging:
                write_extra(staging, extra)
