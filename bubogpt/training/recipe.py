"""The BuboGPT training recipe, top to bottom: one stage's set-up, what trains, optimiser and
schedule, the step loop and its checkpoints; then `train`, which runs a job's stages in order.

It knows nothing of the launcher. It takes

    model          a `BuboGPT` (the starting model, or the one a checkpoint holds)
    config         the stage's `TrainConfig` (bubogpt/training/config.py)
    streams        {dataset: RowStream}: endless batches of decoded rows per dataset; `RatioMixer`
                   picks the dataset of each batch, the same on every worker
    make_stepper   builds the `Stepper` (bubogpt/training/stepper.py) that hides DDP vs DeepSpeed
    callbacks      where checkpoints, log lines, metrics and progress go (`Callbacks`)

`workflows/train.py` runs it inside Ray Train (DDP via `prepare_model`, or a DeepSpeed engine; each
checkpoint reported with `ray.train.report`); a test or a notebook can run it in one process with
`TorchStepper` and a callback that writes checkpoints to a folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bubogpt.checkpoints.training_state import TrainState, stream_positions
from bubogpt.training.config import LoraSettings, TrainConfig, TrainConfigError
from bubogpt.training.data import RatioMixer, RowStream, collate, count_target_tokens
from bubogpt.training.optim import build_optimizer, build_scheduler
from bubogpt.training.stepper import Resume, Stepper

MakeStepper = Callable[[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, TrainConfig], Stepper]
# (checkpoint name, write, metrics): `write(directory)` writes this rank's part of the checkpoint into
# `directory`; the callback chooses the folder, calls it, and records or reports the result.
CheckpointFn = Callable[[str, Callable[[Path], None], dict[str, Any]], None]


@dataclass
class Callbacks:
    checkpoint: CheckpointFn
    log: Callable[[str], None] = print  # progress lines (rank 0 only)
    # (stage, [(step, metrics, time measured)]), rank 0, every `log_every` steps
    metrics: Callable[[str, list[tuple[int, dict[str, float], float]]], None] | None = None
    step_started: Callable[[str, int, int], None] | None = None  # (stage, step, first step of this run), every rank
    # (stage, step, dataset, row ids) of every batch a step trains on (step counted from 1, as in the
    # loss history), every rank: for checking which rows a run read
    batch_taken: Callable[[str, int, str, list[str]], None] | None = None


@dataclass
class Worker:
    """Where this copy of the loop runs."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world: int = 1


# -- what trains -------------------------------------------------------------------------------------


def configure_trainable(model: nn.Module, config: TrainConfig) -> list[str]:
    """Freeze everything, then unfreeze what `config.stage` trains. Returns the trainable names.

    With `config.lora`, call `apply_lora` first: the LoRA weights are then the LLM's trainable part.
    """
    if config.stage == "stage1":
        prefixes: tuple[str, ...] = ("joiner.qformers.audio.", "joiner.projections.audio.")
    else:  # stage2
        prefixes = ("joiner.projections.",)
    if config.train_qformers and config.stage == "stage2":
        prefixes += ("joiner.qformers.",)
    if config.train_vision_encoder:
        prefixes += ("vision_encoder.",)
    if config.train_audio_encoder:
        prefixes += ("audio_encoder.",)
    if config.train_llm:
        prefixes += ("llm.",)
    names = []
    for name, parameter in model.named_parameters():
        trains = name.startswith(prefixes) or (config.lora is not None and "lora_" in name)
        parameter.requires_grad_(trains)
        if trains:
            names.append(name)
    if not names:
        raise TrainConfigError(f"{config.stage}: no parameter is trainable")
    return names


def apply_lora(model: nn.Module, settings: LoraSettings) -> None:
    """Wrap `model.llm` with peft LoRA adapters (in place)."""
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model.llm = get_peft_model(model.llm, lora_config)



# -- one stage ---------------------------------------------------------------------------------------


def autocast_for(device: torch.device, precision: str) -> Callable[[], Any]:
    """Mixed precision on GPU (fp16 or bf16 autocast); CPU and fp32 run in fp32."""
    if device.type != "cuda" or precision == "fp32":
        return nullcontext
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return lambda: torch.autocast("cuda", dtype=dtype)


def keeps_llm(model: nn.Module, config: TrainConfig) -> bool:
    """Copy the LLM into checkpoints unless it is an external, frozen directory (a 7B Vicuna)."""
    return model.config.preset == "tiny" or config.train_llm


def train_stage(
    model: nn.Module,
    config: TrainConfig,
    streams: Mapping[str, RowStream],
    make_stepper: MakeStepper,
    callbacks: Callbacks,
    worker: Worker = Worker(),
    resume: Resume | None = None,
    use_precomputed_tokens: bool = False,
) -> list[tuple[int, float]]:
    """One stage: `config.max_steps` optimiser steps (from `resume`'s step), a checkpoint every
    `checkpoint_every` steps and at the end. Returns the loss history [(step, loss)]."""
    rank, world = worker.rank, worker.world

    # 1. set-up: seeds, where the stage starts
    torch.manual_seed(config.seed + rank)
    start_step = resume.state.step if resume else 0
    loss_history = list(resume.state.loss_history) if resume else []

    # 2. what trains
    if config.lora is not None and not hasattr(model.llm, "peft_config"):
        apply_lora(model, config.lora)
    model.config.max_txt_len = config.max_txt_len
    configure_trainable(model, config)
    model.to(worker.device)

    # 3. optimiser and schedule, behind the stepper (DDP or DeepSpeed)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    stepper = make_stepper(model, optimizer, scheduler, config)
    if resume is not None:
        stepper.restore(resume)
        if resume.streams is not None:  # where each stream stood at the checkpoint
            for name, position in resume.streams.items():
                streams[name].restore(position)
    autocast = autocast_for(worker.device, config.precision)
    mixer = RatioMixer(config.datasets, config.seed)
    use_tokens = config.use_precomputed_tokens and use_precomputed_tokens
    # Caption-style targets (stage 1) end with the model's stage-1 end symbol ("\n" for 7b/13b:
    # mm_gpt4.py:68, :275), instruction answers with its chat end symbol ("###").
    end_sym = {"end_sym": model.config.stage1_end_sym} if config.prompt_style == "caption" else {}

    def checkpoint(step: int, metrics: dict[str, Any]) -> None:
        state = TrainState(config.stage, step, config.to_dict(), loss_history)
        positions = stream_positions(rank, world, {name: stream.state() for name, stream in streams.items()})
        write = lambda directory: stepper.save(directory, model, state, keeps_llm(model, config), positions)  # noqa: E731
        callbacks.checkpoint(f"{config.stage}_step_{step:06d}", write, metrics)

    # 4. the step loop
    stepper.model.train()
    started = window_start = time.time()
    pending: list[tuple[int, dict[str, float], float]] = []
    if rank == 0:
        resumed = " (streams where the checkpoint left them)" if resume is not None and resume.streams is not None else ""
        callbacks.log(f"{config.stage}: steps {start_step}..{config.max_steps}, datasets {config.datasets}{resumed}")
    for step in range(start_step, config.max_steps):
        if callbacks.step_started:
            callbacks.step_started(config.stage, step, start_step)
        # Randomness (the instructions drawn, dropout) depends on the step only: a resumed run draws
        # what an uninterrupted one would.
        rng = np.random.default_rng([config.seed, rank, step])
        torch.manual_seed(int(np.random.SeedSequence([config.seed, rank, step]).generate_state(1)[0]))
        step_loss, samples, tokens = 0.0, 0, 0
        for micro in range(config.grad_accum_steps):
            dataset = mixer.choose(step, micro)
            rows = streams[dataset].next_rows()
            if callbacks.batch_taken:
                callbacks.batch_taken(config.stage, step + 1, dataset, [str(row.get("id")) for row in rows])
            batch = collate(rows, config.prompt_style, rng, use_tokens).to(worker.device)
            with stepper.micro_batch(last=micro == config.grad_accum_steps - 1), autocast():
                output = stepper.model(**batch.model_inputs(), **end_sym)
            stepper.backward(output.loss)
            step_loss += output.loss.item() / config.grad_accum_steps
            samples += len(batch)
            tokens += count_target_tokens(output.labels)
        stepper.step()
        done, lr = step + 1, stepper.lr()
        loss_history.append((done, round(step_loss, 5)))
        elapsed = max(time.time() - window_start, 1e-6)
        window_start = time.time()
        pending.append((done, {"loss": step_loss, "lr": lr, "samples_per_s": samples * world / elapsed,
                               "tokens_per_s": tokens * world / elapsed, f"loss_{dataset}": step_loss},
                        time.time()))  # fmt: skip
        is_last = done == config.max_steps
        if done % config.log_every == 0 or is_last:
            if rank == 0:
                recent = [v for _, v in loss_history[-config.log_every:]]
                rate = (done - start_step) / max(time.time() - started, 1e-6)
                eta = (config.max_steps - done) / max(rate, 1e-9)
                callbacks.log(
                    f"{config.stage} step {done}/{config.max_steps} ({100 * done / config.max_steps:.0f}%) "
                    f"loss {np.mean(recent):.4f} lr {lr:.2e} {pending[-1][1]['samples_per_s']:.1f} samples/s "
                    f"{pending[-1][1]['tokens_per_s']:.0f} tokens/s, eta {eta / 60:.1f} min"
                )
                if callbacks.metrics:
                    callbacks.metrics(config.stage, pending)
            pending = []

        # 5. checkpoints
        if done % config.checkpoint_every == 0 or is_last:
            checkpoint(done, {"stage": config.stage, "step": done, "loss": step_loss, "lr": lr})
    if rank == 0:
        callbacks.log(f"{config.stage}: finished {config.max_steps} steps in {(time.time() - started) / 60:.1f} min")
    return loss_history


# -- a job's stages ----------------------------------------------------------------------------------


def train(
    model: nn.Module,
    stages: list[TrainConfig],
    streams_for: Callable[[TrainConfig], Mapping[str, RowStream]],
    make_stepper: MakeStepper,
    callbacks: Callbacks,
    worker: Worker = Worker(),
    resume: Resume | None = None,
    use_precomputed_tokens: bool = False,
) -> None:
    """The stages in order, each continuing from the model the previous one ended with. With
    `resume` (a checkpoint of one of `stages`), the finished stages are skipped and the checkpoint's
    stage continues from its step."""
    first = 0
    if resume is not None:
        names = [c.stage for c in stages]
        if resume.state.stage not in names:
            raise TrainConfigError(f"the checkpoint is of stage {resume.state.stage}, which this job ({names}) does not run")
        first = names.index(resume.state.stage)
        if resume.state.step >= stages[first].max_steps:
            first, resume = first + 1, None
    for config in stages[first:]:
        stage_resume = resume if resume is not None and resume.state.stage == config.stage else None
        train_stage(model, config, streams_for(config), make_stepper, callbacks, worker, stage_resume, use_precomputed_tokens)
        resume = None
    if worker.rank == 0:
        callbacks.log("all stages finished")
