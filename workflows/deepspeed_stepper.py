"""DeepSpeed ZeRO-2/3 behind the recipe's `Stepper` interface (bubogpt/training/stepper.py).

The engine owns the optimiser and the schedule: it steps at the gradient-accumulation boundary
itself (`engine.step()` after every micro-batch), scales fp16 losses, clips, and checkpoints its
optimiser partitions -- every rank writes its own, rank 0 also the (gathered) model and the state.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bubogpt.atomic import atomic_directory
from bubogpt.checkpoints.training_state import MODEL_DIR, TrainState, write_extra, write_model, write_state
from bubogpt.training import Resume, TrainConfig

ZERO_STAGES = {"zero2": 2, "zero3": 3}
ENGINE_DIR = "deepspeed"  # the engine's checkpoint inside a checkpoint folder


def deepspeed_config(config: TrainConfig, zero_stage: int, on_gpu: bool) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum_steps,
        "gradient_clipping": config.grad_clip or 0.0,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # our AdamW with its two weight-decay groups
        "fp16": {"enabled": on_gpu and config.precision == "fp16"},
        "bf16": {"enabled": on_gpu and config.precision == "bf16"},
        "steps_per_print": 1 << 30,
    }


class DeepSpeedStepper:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, config: TrainConfig,
                 zero_stage: int, rank: int, on_gpu: bool):  # fmt: skip
        import deepspeed

        self.zero_stage, self.rank = zero_stage, rank
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(config, zero_stage, on_gpu),
        )  # fmt: skip

    def micro_batch(self, last: bool):
        return nullcontext()  # the engine knows the accumulation boundary

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)
        self.model.step()

    def step(self) -> None:
        pass  # done by `engine.step()` at the boundary

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def restore(self, resume: Resume) -> None:
        if resume.engine_dir is not None:
            self.model.load_checkpoint(str(resume.engine_dir), tag="state")
            shutil.rmtree(resume.engine_dir.parent, ignore_errors=True)  # the copy `engine_checkpoint_copy` made

    def _gathered(self):
        """ZeRO-3 partitions the parameters: gather them (on every rank) around a save."""
        if self.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.model.module.parameters()), modifier_rank=None)
        return nullcontext()

    def save(self, directory: Path, model: nn.Module, state: TrainState, include_llm: bool, extra: dict[str, bytes]) -> None:
        with atomic_directory(directory) as staging:
            self.model.save_checkpoint(str(staging / ENGINE_DIR), tag="state")
            write_extra(staging, extra)
            with self._gathered():
                if self.rank == 0:
                    write_model(model, staging / MODEL_DIR, include_llm=include_llm)
                    write_state(staging, state)


def engine_checkpoint_copy(checkpoint_dir: Path) -> Path | None:
    """A copy of a checkpoint's engine folder (in a new temporary folder) that outlives the
    checkpoint's own temporary directory; `restore` deletes it once loaded."""
    source = Path(checkpoint_dir) / ENGINE_DIR
    if not source.is_dir():
        return None
    scratch = Path(tempfile.mkdtemp(prefix="bubogpt-ds-"))
    shutil.copytree(source, scratch / ENGINE_DIR)
    return scratch / ENGINE_DIR
