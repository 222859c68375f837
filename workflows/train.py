"""`bubogpt train`: the BuboGPT stages on Ray Train, tracked in MLflow.

    bubogpt train --data PREPARED --out OUT --stage NAME|all --preset tiny|7b|13b
                  [--config FILE] [--max-steps N] [--num-workers N] [--tracking-uri URI]
                  [--deepspeed zero2|zero3] [--init MODEL_DIR]

The recipe (stages, what each trains, hyper-parameters) is `bubogpt/training.py`. The driver starts
one `TorchTrainer.fit()` for the whole job -- one worker-group start, not one per stage -- whose
workers run `train_func`:

    1. model: the latest checkpoint of the job when Ray restarts the workers after a failure
       (`ray.train.get_checkpoint()`), else OUT/init (or --init); stage k+1 continues from the
       model stage k ended with, and each stage end is a checkpoint of its own;
    2. data: the prepared Parquet through Ray Data (`ray.train.get_dataset_shard`). "memory" mode
       (default) reads the rows once per worker and samples batches locally; "stream" iterates a
       shard per dataset and epoch, for corpora that do not fit in memory. Each batch comes from one
       dataset, picked by `RatioMixer` -- the same on every worker;
    3. DDP by default (`ray.train.torch.prepare_model`), DeepSpeed ZeRO-2/3 with `--deepspeed`
       (gloo on CPU, so it runs anywhere);
    4. every `checkpoint_every` steps and at each stage's end: a checkpoint (whole model in
       safetensors + config, optimiser, step), written atomically, then `ray.train.report`.

Output folder:

    OUT/init/               the starting model (tiny: built here; 7b/13b: a copy of --init)
    OUT/ray/train/          Ray Train's storage: <stage>_step_<N>/ checkpoint folders
    OUT/stages.json         each stage's final checkpoint
    OUT/model/              the exported final model (`save_model` layout; what serving loads)
    OUT/eval.json           evaluation of the final model on the held-out splits
    OUT/progress/           rank<N>.json: pid, stage and step of each worker (monitoring)
    OUT/run.json            MLflow tracking URI, job run id and stage run ids
    OUT/mlflow.db, mlartifacts/   the local tracking store when no tracking URI is given

Rerunning the same command resumes from the furthest complete checkpoint in OUT/ray/train.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bubogpt.checkpoints.native import CONFIG_FILE, WEIGHTS_FILE
from bubogpt.checkpoints.training_state import (
    MODEL_DIR,
    STATE_FILE,
    TrainState,
    atomic_directory,
    commit,
    is_complete,
    list_files,
    load_optimizer_state,
    read_model,
    read_state,
    save_checkpoint,
    write_model,
)
from bubogpt.training import (
    TrainConfig,
    TrainConfigError,
    apply_lora,
    build_optimizer,
    build_scheduler,
    collate,
    configure_trainable,
    count_target_tokens,
    flatten,
    load_overrides,
    resolve_stages,
    RatioMixer,
)
from workflows.data.prepared import DATASETS, decode_row_tensors, read_manifest, shard_paths

STAGES_FILE = "stages.json"
RUN_FILE = "run.json"  # the MLflow run ids of the job and of its stages
PROGRESS_DIR = "progress"  # per-rank progress files (step, pid): for monitoring and the fault test

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
TEXT_COLUMNS = ["dataset", "split", "id", "instruction", "answer", "meta"]


class TrainJobError(ValueError):
    """The training job cannot start: bad arguments, missing data or starting model."""


def log(message: str) -> None:
    print(f"[bubogpt train] {message}", flush=True)


# ==================================================================================================
# Worker side
# ==================================================================================================


class InMemoryData:
    """Every training row this worker samples from, read once from its Ray Data shard into memory
    (Arrow tables per dataset; media decoded per batch). For corpora that fit in memory: no
    per-epoch pipeline restarts, and ratio mixing draws from all datasets at no cost."""

    def __init__(self, shard, manifest: dict, text_only_columns: bool = False):
        import pyarrow as pa

        tables: dict[str, list] = {}
        for block in shard.iter_batches(batch_size=512, batch_format="pyarrow"):
            for name in set(block.column("dataset").to_pylist()):
                mask = pa.compute.equal(block.column("dataset"), name)
                tables.setdefault(name, []).append(block.filter(mask))
        self.tables = {name: pa.concat_tables(parts) for name, parts in tables.items()}
        self.manifest = manifest

    def stream(self, name: str, batch_size: int, seed: int) -> "LocalStream":
        if name not in self.tables or self.tables[name].num_rows == 0:
            raise TrainJobError(f"dataset {name}: no training rows were loaded")
        return LocalStream(self.tables[name], batch_size, self.manifest, seed)


class LocalStream:
    """Endless batches from one in-memory table, reshuffled every epoch."""

    def __init__(self, table, batch_size: int, manifest: dict, seed: int):
        self.table, self.batch_size, self.manifest = table, batch_size, manifest
        self.rng = np.random.default_rng(seed)
        self.order, self.position = np.empty(0, dtype=np.int64), 0

    def next_rows(self, decode: bool = True) -> list[dict[str, Any]]:
        indices = []
        while len(indices) < min(self.batch_size, self.table.num_rows):
            if self.position >= len(self.order):
                self.order, self.position = self.rng.permutation(self.table.num_rows), 0
            take = self.order[self.position : self.position + self.batch_size - len(indices)]
            indices.extend(take.tolist())
            self.position += len(take)
        rows = self.table.take(indices).to_pylist()
        if decode:
            for row in rows:
                row.update(decode_row_tensors(row, self.manifest))
        return rows


class ShardStream:
    """Streaming alternative for corpora too big for memory: endless batches from one dataset's
    Ray Data shard, a new (reshuffled) epoch whenever one ends."""

    def __init__(self, name: str, shard, batch_size: int, manifest: dict, seed: int):
        self.name, self.shard, self.batch_size = name, shard, batch_size
        self.manifest, self.seed = manifest, seed
        self.epoch = 0
        self._batches = None

    def next_rows(self, decode: bool = True) -> list[dict[str, Any]]:
        for _ in range(2):
            if self._batches is None:
                self._batches = iter(self.shard.iter_batches(
                    batch_size=self.batch_size, batch_format="pyarrow",
                    local_shuffle_buffer_size=4 * self.batch_size, local_shuffle_seed=self.seed + self.epoch,
                ))  # fmt: skip
            try:
                rows = next(self._batches).to_pylist()
            except StopIteration:
                self._batches = None
                self.epoch += 1
                continue
            if decode:
                for row in rows:
                    row.update(decode_row_tensors(row, self.manifest))
            return rows
        raise TrainJobError(f"dataset {self.name}: this worker's shard has no rows (fewer rows than workers?)")


def _device_and_autocast(precision: str) -> tuple[torch.device, Any, torch.amp.GradScaler | None]:
    import ray.train.torch

    device = ray.train.torch.get_device()
    if device.type != "cuda" or precision == "fp32":
        return device, nullcontext, None
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    autocast = lambda: torch.autocast("cuda", dtype=dtype)  # noqa: E731
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return device, autocast, scaler


def _include_llm(model, config: TrainConfig) -> bool:
    """Copy the LLM into checkpoints unless it is an external, frozen directory (a 7B Vicuna)."""
    return model.config.preset == "tiny" or config.train_llm


def _deepspeed_config(config: TrainConfig, zero_stage: int, on_gpu: bool) -> dict[str, Any]:
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


def _gathered(engine, zero_stage: int):
    """ZeRO-3 partitions the parameters: gather them (on every rank) around a save."""
    if zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return nullcontext()


def _write_progress(out_dir: str, rank: int, stage: str, step: int, resumed_from: int) -> None:
    folder = Path(out_dir) / PROGRESS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank{rank}.json"
    tmp = folder / f".rank{rank}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"pid": os.getpid(), "stage": stage, "step": step, "resumed_from": resumed_from,
                               "time": time.time()}))  # fmt: skip
    os.replace(tmp, path)


def _further(stored: Path, registered, stages: list[TrainConfig]) -> bool:
    """Is the stored checkpoint further along (stage order, then step) than the registered one?"""
    order = [c.stage for c in stages]
    with registered.as_directory() as directory:
        theirs = read_state(directory)
    ours = read_state(stored)
    return (order.index(ours.stage), ours.step) > (order.index(theirs.stage), theirs.step)


@dataclass
class WorkerContext:
    rank: int
    world: int
    device: torch.device
    zero_stage: int
    out_dir: str
    tracker: Any  # MlflowTracker on rank 0 when tracking, else None
    stage_runs: dict[str, str]


def train_func(loop_config: dict[str, Any]) -> None:
    """All stages of the job on one Ray Train worker (see the module docstring)."""
    import ray
    import ray.train

    stages = [TrainConfig.from_dict(d) for d in loop_config["stages"]]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(loop_config.get("threads_per_worker", 1))
    # Where each worker runs, in the job's output (multi-node checks read it).
    print(f"bubogpt train worker rank {rank}/{world} on node {ray.get_runtime_context().get_node_id()}", flush=True)
    tracker = None
    if rank == 0 and loop_config.get("tracking"):
        from workflows.tracking import MlflowTracker

        tracker = MlflowTracker.attach(loop_config["tracking"]["uri"], loop_config["tracking"]["run_id"])
    import ray.train.torch

    worker = WorkerContext(
        rank, world, ray.train.torch.get_device(), {"zero2": 2, "zero3": 3}.get(loop_config.get("deepspeed") or "", 0),
        loop_config["out_dir"], tracker, (loop_config.get("tracking") or {}).get("stage_runs", {}),
    )  # fmt: skip

    # 1. model: the latest checkpoint of this job (after a failure), else the starting model.
    # `get_checkpoint()` is the last checkpoint the controller registered; a report it had not yet
    # collected when a worker died is lost to it, though its folder is complete in storage: take
    # whichever is further along.
    checkpoint = ray.train.get_checkpoint()
    stored = latest_job_checkpoint(Path(loop_config["storage"]), stages)
    if stored is not None and (checkpoint is None or _further(stored, checkpoint, stages)):
        checkpoint = ray.train.Checkpoint.from_directory(str(stored))
    resume = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = read_state(directory)
            model = read_model(Path(directory) / MODEL_DIR)
            resume = {"state": state, "optimizer": load_optimizer_state(directory), "deepspeed": None}
            if (Path(directory) / "deepspeed").is_dir():
                ds_dir = Path(tempfile.mkdtemp(prefix="bubogpt-ds-"))
                shutil.copytree(Path(directory) / "deepspeed", ds_dir / "deepspeed")
                resume["deepspeed"] = ds_dir / "deepspeed"
        if rank == 0:
            log(f"resuming from the checkpoint of {state.stage} at step {state.step}")
    else:
        model = read_model(loop_config["init_dir"])

    # 2. data
    if loop_config.get("data_mode", "memory") == "memory":
        data = InMemoryData(ray.train.get_dataset_shard("train"), loop_config["manifest"])
        if rank == 0:
            log("loaded the training rows: " + ", ".join(f"{k} {t.num_rows}" for k, t in sorted(data.tables.items())))
        streams_for = lambda config: {  # noqa: E731
            name: data.stream(name, config.batch_size, config.seed + 7919 * rank) for name in config.datasets
        }
    else:
        streams_for = lambda config: {  # noqa: E731
            name: ShardStream(name, ray.train.get_dataset_shard(name), config.batch_size, loop_config["manifest"],
                              config.seed + 7919 * rank)
            for name in config.datasets
        }  # fmt: skip

    # 3. the stages, in order; a resumed job skips the finished ones
    first = 0
    if resume is not None:
        names = [c.stage for c in stages]
        first = names.index(resume["state"].stage)
        if resume["state"].step >= stages[first].max_steps:
            first, resume = first + 1, None
    for config in stages[first:]:
        stage_resume = resume if resume is not None and resume["state"].stage == config.stage else None
        train_stage(model, config, streams_for(config), worker, loop_config, stage_resume)
        resume = None
    if rank == 0:
        log("all stages finished")


def train_stage(model, config: TrainConfig, streams: dict[str, Any], worker: WorkerContext,
                loop_config: dict[str, Any], resume: dict[str, Any] | None) -> None:  # fmt: skip
    """One stage's loop: freeze/unfreeze, optimiser, DDP or DeepSpeed, steps, checkpoints."""
    import ray.train
    import ray.train.torch

    rank, world, zero_stage = worker.rank, worker.world, worker.zero_stage
    torch.manual_seed(config.seed + rank)
    _, autocast, scaler = _device_and_autocast(config.precision)
    start_step = resume["state"].step if resume else 0
    loss_history = list(resume["state"].loss_history) if resume else []
    if config.lora is not None and not hasattr(model.llm, "peft_config"):
        apply_lora(model, config.lora)
    model.config.max_txt_len = config.max_txt_len
    configure_trainable(model, config)
    model.to(worker.device)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    if zero_stage:
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=_deepspeed_config(config, zero_stage, worker.device.type == "cuda"),
        )  # fmt: skip
        if resume and resume.get("deepspeed"):
            engine.load_checkpoint(str(resume["deepspeed"]), tag="state")
            shutil.rmtree(Path(resume["deepspeed"]).parent, ignore_errors=True)
        train_model = engine
    else:
        if resume and resume.get("optimizer") is not None:
            optimizer.load_state_dict(resume["optimizer"])
        for _ in range(start_step):
            scheduler.step()  # LambdaLR: continue where the checkpoint left off
        modalities = {DATASET_MODALITIES.get(name, ()) for name in config.datasets}
        # A stage that mixes modalities leaves some trainable modules without gradient in a step
        # (a clotho batch never reaches the vision projection): only then must DDP look for them.
        train_model = ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": len(modalities) > 1}
        )
    mixer = RatioMixer(config.datasets, config.seed)
    use_tokens = config.use_precomputed_tokens and loop_config.get("precomputed_tokens_match", False)
    stage_run = worker.stage_runs.get(config.stage)
    pending: list[tuple[int, dict[str, float]]] = []

    def checkpoint_and_report(step: int, metrics: dict[str, Any]) -> None:
        local = Path(tempfile.mkdtemp(prefix=f"bubogpt-ckpt-{config.stage}-"))
        name = f"{config.stage}_step_{step:06d}"
        target = local / name
        state = TrainState(config.stage, step, config.to_dict(), loss_history)
        if zero_stage:
            # Every rank writes its own optimiser partition; rank 0 also the model and state.
            staging, final = atomic_directory(target)
            engine.save_checkpoint(str(staging / "deepspeed"), tag="state")
            with _gathered(engine, zero_stage):
                if rank == 0:
                    write_model(model, staging / MODEL_DIR, include_llm=_include_llm(model, config))
                    state.files = list_files(staging)
                    (staging / STATE_FILE).write_text(state.to_json())
            commit(staging, final)
        elif rank == 0:
            save_checkpoint(target, model, state, optimizer, include_llm=_include_llm(model, config))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(target)) if target.is_dir() else None,
            checkpoint_dir_name=name,
        )
        shutil.rmtree(local, ignore_errors=True)

    train_model.train()
    started = window_start = time.time()
    rng = np.random.default_rng([config.seed, rank, start_step])
    text_only = config.prompt_style == "text"
    if rank == 0:
        log(f"{config.stage}: steps {start_step}..{config.max_steps}, datasets {config.datasets}")
    for step in range(start_step, config.max_steps):
        _write_progress(worker.out_dir, rank, config.stage, step, start_step)
        step_loss, samples, tokens = 0.0, 0, 0
        for micro in range(config.grad_accum_steps):
            dataset = mixer.choose(step, micro)
            rows = streams[dataset].next_rows(decode=not text_only)
            batch = collate(rows, config.prompt_style, rng, use_tokens).to(worker.device)
            last_micro = micro == config.grad_accum_steps - 1
            sync = nullcontext() if (zero_stage or last_micro or world == 1) else train_model.no_sync()
            with sync, autocast():
                output = train_model(**batch.model_inputs())
            if zero_stage:
                train_model.backward(output.loss)
                train_model.step()
            else:
                scaled = output.loss / config.grad_accum_steps
                (scaler.scale(scaled) if scaler else scaled).backward()
            step_loss += output.loss.item() / config.grad_accum_steps
            samples += len(batch)
            tokens += count_target_tokens(output.labels)
        if not zero_stage:
            if scaler:
                scaler.unscale_(optimizer)
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        done = step + 1
        lr = optimizer.param_groups[0]["lr"]
        loss_history.append((done, round(step_loss, 5)))
        elapsed = max(time.time() - window_start, 1e-6)
        window_start = time.time()
        pending.append((done, {"loss": step_loss, "lr": lr, "samples_per_s": samples * world / elapsed,
                               "tokens_per_s": tokens * world / elapsed, f"loss_{dataset}": step_loss}))  # fmt: skip
        is_last = done == config.max_steps
        if done % config.log_every == 0 or is_last:
            if rank == 0:
                recent = [v for _, v in loss_history[-config.log_every:]]
                rate = (done - start_step) / max(time.time() - started, 1e-6)
                eta = (config.max_steps - done) / max(rate, 1e-9)
                log(
                    f"{config.stage} step {done}/{config.max_steps} ({100 * done / config.max_steps:.0f}%) "
                    f"loss {np.mean(recent):.4f} lr {lr:.2e} {pending[-1][1]['samples_per_s']:.1f} samples/s "
                    f"{pending[-1][1]['tokens_per_s']:.0f} tokens/s, eta {eta / 60:.1f} min"
                )
                if worker.tracker is not None and stage_run:
                    worker.tracker.log_step_metrics(pending, stage_run)
            pending = []
        if done % config.checkpoint_every == 0 or is_last:
            checkpoint_and_report(done, {"stage": config.stage, "step": done, "loss": step_loss, "lr": lr})
    if rank == 0:
        log(f"{config.stage}: finished {config.max_steps} steps in {(time.time() - started) / 60:.1f} min")


# ==================================================================================================
# Driver side
# ==================================================================================================

JOB_NAME = "train"  # Ray Train run name under OUT/ray


def _training_datasets(data_dir: Path, configs: list[TrainConfig], data_mode: str) -> dict[str, Any]:
    """memory: one dataset "train" with every training row the stages use (each worker reads all of
    it); stream: one dataset per corpus set, split across the workers."""
    import ray.data

    names = sorted({name for config in configs for name in config.datasets})
    paths = {}
    for name in names:
        if name not in DATASETS:
            raise TrainJobError(f"unknown dataset {name!r}; expected one of {DATASETS}")
        try:
            paths[name] = [str(p) for p in shard_paths(data_dir, name, "train")]
        except ValueError as err:
            raise TrainJobError(f"the recipe needs {name}: {err}") from err
    media_free = all(c.prompt_style == "text" for c in configs)
    columns = TEXT_COLUMNS if media_free else None
    if data_mode == "memory":
        return {"train": ray.data.read_parquet([p for name in names for p in paths[name]], columns=columns)}
    return {name: ray.data.read_parquet(paths[name], columns=columns).randomize_block_order() for name in names}


def _tensor_fingerprint(path: Path, prefix: str) -> str | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    digest = hashlib.sha1()
    with safe_open(str(path), framework="pt") as tensors:
        for key in sorted(k for k in tensors.keys() if k.startswith(prefix)):
            digest.update(key.encode())
            digest.update(tensors.get_tensor(key).float().numpy().tobytes())
    return digest.hexdigest()


def precomputed_tokens_match(manifest: dict, model_dir: Path) -> bool:
    """Precomputed encoder tokens are usable when they came from exactly this model's encoders."""
    features_model = manifest.get("features_model")
    if not manifest.get("features") or not features_model:
        return False
    ours, theirs = model_dir / WEIGHTS_FILE, Path(features_model) / WEIGHTS_FILE
    return all(
        _tensor_fingerprint(ours, prefix) == _tensor_fingerprint(theirs, prefix) is not None
        for prefix in ("audio_encoder.", "vision_encoder.")
    )


def stage_checkpoints(storage: Path) -> dict[str, list[tuple[int, Path]]]:
    """Complete checkpoints under the job's Ray storage folder: {stage: [(step, folder)] by step}."""
    found: dict[str, list[tuple[int, Path]]] = {}
    if not storage.is_dir():
        return found
    for folder in storage.iterdir():
        if folder.is_dir() and not folder.name.startswith(".") and is_complete(folder):
            state = read_state(folder)
            found.setdefault(state.stage, []).append((state.step, folder))
    return {stage: sorted(items) for stage, items in found.items()}


def latest_job_checkpoint(storage: Path, configs: list[TrainConfig]) -> Path | None:
    """The furthest complete checkpoint of this job's stages (stage order first, then step)."""
    found = stage_checkpoints(storage)
    for config in reversed(configs):
        if found.get(config.stage):
            return found[config.stage][-1][1]
    return None


def run_job(
    configs: list[TrainConfig],
    data_dir: Path,
    out_dir: Path,
    init_dir: Path,
    manifest: dict,
    options: argparse.Namespace,
    tracking: dict[str, Any] | None,
) -> dict[str, Path]:
    """Every stage in one `TorchTrainer.fit()` (one worker group start); returns each stage's final
    checkpoint. Resumes from the furthest checkpoint already in OUT/ray when rerun."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    storage = out_dir / "ray"
    previous = latest_job_checkpoint(storage / JOB_NAME, configs)
    if previous is not None:
        state = read_state(previous)
        log(f"found a checkpoint of {state.stage} at step {state.step} in {previous}: resuming from it")
    data_mode = options.data_mode
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "stages": [c.to_dict() for c in configs],
            "init_dir": str(init_dir),
            "manifest": manifest,
            "out_dir": str(out_dir),
            "storage": str(storage / JOB_NAME),
            "deepspeed": options.deepspeed,
            "tracking": tracking,
            "data_mode": data_mode,
            "threads_per_worker": max(1, int(options.cpus_per_worker)),
            "precomputed_tokens_match": precomputed_tokens_match(manifest, init_dir),
        },
        torch_config=TorchConfig(backend="nccl" if options.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=options.num_workers, use_gpu=options.use_gpu,
            resources_per_worker={"CPU": options.cpus_per_worker},
        ),  # fmt: skip
        run_config=ray.train.RunConfig(
            name=JOB_NAME,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=options.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),  # stage ends are kept
        ),
        datasets=_training_datasets(data_dir, configs, data_mode),
        # memory mode: every worker reads every row (and samples its own batches)
        dataset_config=ray.train.DataConfig(datasets_to_split=[] if data_mode == "memory" else "all"),
        resume_from_checkpoint=ray.train.Checkpoint.from_directory(str(previous)) if previous else None,
    )
    log(f"stages {[c.stage for c in configs]} on {options.num_workers} worker(s)"
        + (f", DeepSpeed {options.deepspeed}" if options.deepspeed else ", DDP"))  # fmt: skip
    trainer.fit()  # raises ray.train.TrainingFailedError when the failures exceed max_failures
    found = stage_checkpoints(storage / JOB_NAME)
    finals = {}
    for config in configs:
        ends = [folder for step, folder in found.get(config.stage, []) if step == config.max_steps]
        if not ends:
            raise TrainJobError(f"{config.stage}: no checkpoint at its last step {config.max_steps} in {storage}")
        finals[config.stage] = ends[-1]
    return finals


def build_initial_model(preset: str, out_dir: Path, init: Path | None, seed: int) -> Path:
    """OUT/init: the first stage's starting model (tiny: built here; 7b/13b: a copy of --init)."""
    target = out_dir / "init"
    if (target / CONFIG_FILE).is_file():
        return target
    if init is None and preset != "tiny":
        raise TrainJobError(
            f"preset {preset} starts from pretrained encoders, Q-Formers and a Vicuna: pass --init with a "
            "BuboGPT model directory converted from the original checkpoints"
        )
    if init is not None and not (init / CONFIG_FILE).is_file():
        raise TrainJobError(f"--init {init} is not a BuboGPT model directory (no {CONFIG_FILE})")
    staging, final = atomic_directory(target)
    if init is not None:
        shutil.rmtree(staging)
        shutil.copytree(init, staging)
    else:
        from bubogpt.training import build_tiny_model

        write_model(build_tiny_model(seed), staging, include_llm=True)
    return commit(staging, final)


def export_model(checkpoint: Path, out_dir: Path) -> Path:
    """OUT/model (what serving loads): the final checkpoint's model, LoRA merged into the LLM."""
    from bubogpt.checkpoints.native import save_model
    from bubogpt.checkpoints.training_state import LORA_DIR

    source = checkpoint / MODEL_DIR
    staging, final = atomic_directory(out_dir / "model")
    if (source / LORA_DIR).is_dir():
        model = read_model(source, trainable_lora=False)
        model.llm = model.llm.merge_and_unload()
        save_model(model, staging, include_llm=True)
    else:
        shutil.rmtree(staging)
        shutil.copytree(source, staging)
    return commit(staging, final)


def _apply_job_overrides(configs: list[TrainConfig], args: argparse.Namespace) -> list[TrainConfig]:
    changed = []
    for config in configs:
        overrides: dict[str, Any] = {}
        if args.max_steps is not None:
            overrides["max_steps"] = args.max_steps
            overrides["warmup_steps"] = min(config.warmup_steps, args.max_steps // 5)
            overrides["checkpoint_every"] = min(config.checkpoint_every, args.max_steps)
            overrides["log_every"] = min(config.log_every, args.max_steps)
        if args.batch_size is not None:
            overrides["batch_size"] = args.batch_size
        changed.append(config.with_overrides(overrides))
    return changed


def _stage_init(args: argparse.Namespace, configs: list[TrainConfig], overrides: dict, init_dir: Path) -> Path:
    """A job that starts at a later stage (e.g. --stage stage2) starts from --init, else from the
    previous stage's final checkpoint in the same OUT when there is one."""
    if args.init is not None or args.stage == "all":
        return init_dir
    order = [c.stage for c in resolve_stages(args.preset, "all", overrides)]
    before = order[: order.index(configs[0].stage)]
    if before:
        found = stage_checkpoints(Path(args.out).resolve() / "ray" / JOB_NAME).get(before[-1], [])
        if found:
            return found[-1][1] / MODEL_DIR
    return init_dir


def log_stage_artifacts(tracker, config: TrainConfig, checkpoint: Path, run_id: str) -> None:
    from workflows.tracking import loss_curve_png

    state = read_state(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        png = loss_curve_png(state.loss_history, Path(tmp) / f"loss_{config.stage}.png", f"{config.stage}: training loss")
        tracker.log_artifact(png, None, run_id)
        config_path = Path(tmp) / "train_config.json"
        config_path.write_text(json.dumps(config.to_dict(), indent=2))
        tracker.log_artifact(config_path, None, run_id)
    tracker.log_metrics({"final_loss": state.loss_history[-1][1]}, config.max_steps, run_id)


def sample_generations(model_dir: Path, data_dir: Path, config: TrainConfig, per_dataset: int = 2) -> list[dict]:
    """A few answers of a stage's model on held-out rows of the stage's datasets, in its prompt style."""
    from bubogpt.conversation import caption_prompt, instruction_prompt
    from workflows.data.prepared import read_split

    manifest = read_manifest(data_dir)
    model = read_model(model_dir, trainable_lora=False).eval()
    samples = []
    for name in sorted(config.datasets):
        rows = read_split(data_dir, name, "eval").slice(0, per_dataset).to_pylist()
        for row in rows:
            tensors = decode_row_tensors(row, manifest)
            image, audio = tensors.get("pixel_values"), tensors.get("fbank")
            if config.prompt_style == "text":
                prompt, image, audio = [f"###Human: {row['instruction']} ###Assistant:"], None, None
            else:
                modalities = [m for m, t in (("vision", image), ("audio", audio)) if t is not None]
                prompt = (caption_prompt(modalities) if config.prompt_style == "caption"
                          else instruction_prompt(modalities, row["instruction"] or "Describe it."))  # fmt: skip
            answer = model.generate([prompt], image=None if image is None else image[None],
                                    audio=None if audio is None else audio[None], max_new_tokens=48)[0]  # fmt: skip
            samples.append({"dataset": name, "id": row["id"], "instruction": row["instruction"],
                            "reference": row["answer"], "generated": answer})  # fmt: skip
    return samples


def run_training(args: argparse.Namespace) -> int:
    import ray

    from workflows.tracking import MlflowTracker, resolve_tracking_uri

    data_dir, out_dir = Path(args.data).resolve(), Path(args.out).resolve()
    manifest = read_manifest(data_dir)
    overrides = load_overrides(args.config) if args.config else {}
    configs = _apply_job_overrides(resolve_stages(args.preset, args.stage, overrides), args)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(address=args.address)
    ray.data.DataContext.get_current().enable_progress_bars = False  # our own progress lines instead

    uri, artifact_location = resolve_tracking_uri(args.tracking_uri, out_dir)
    job_params = {"preset": args.preset, "stage": args.stage, "data": str(data_dir), "num_workers": args.num_workers,
                  "deepspeed": args.deepspeed or "none", "stages": ",".join(c.stage for c in configs),
                  "data_mode": args.data_mode}  # fmt: skip
    tracker = MlflowTracker.start_job(uri, f"{args.preset}-{args.stage}", job_params, artifact_location)
    log(f"MLflow run {tracker.run_id} at {uri}")
    status = "FAILED"
    try:
        init_dir = build_initial_model(args.preset, out_dir, Path(args.init).resolve() if args.init else None, args.seed)
        init_dir = _stage_init(args, configs, overrides, init_dir)
        tracker.log_params(flatten(json.loads((init_dir / CONFIG_FILE).read_text()), "model."))
        stage_runs = {c.stage: tracker.start_stage(c.stage, flatten(c.to_dict())) for c in configs}
        run_record = {"tracking_uri": uri, "run_id": tracker.run_id, "stage_runs": stage_runs}
        (out_dir / RUN_FILE).write_text(json.dumps(run_record, indent=2))
        started = time.time()
        finals = run_job(configs, data_dir, out_dir, init_dir, manifest, args,
                         {"uri": uri, "run_id": tracker.run_id, "stage_runs": stage_runs})  # fmt: skip
        minutes = (time.time() - started) / 60
        log(f"training finished in {minutes:.1f} min (all stages, Ray start-up included)")
        tracker.log_metrics({"train_minutes": minutes}, 0)
        for config in configs:
            log_stage_artifacts(tracker, config, finals[config.stage], stage_runs[config.stage])
            if args.samples:
                samples = sample_generations(finals[config.stage] / MODEL_DIR, data_dir, config)
                tracker.log_text(json.dumps(samples, indent=2), "sample_generations.json", stage_runs[config.stage])
            tracker.end_run(stage_runs[config.stage])
        (out_dir / STAGES_FILE).write_text(json.dumps({k: str(v) for k, v in finals.items()}, indent=2))
        model_dir = export_model(finals[configs[-1].stage], out_dir)
        log(f"exported the final model to {model_dir}")
        if args.eval:
            from workflows.evaluate import evaluate_model, log_evaluation

            report = evaluate_model(model_dir, data_dir, limit=args.eval_limit)
            log_evaluation(report, tracker, out_dir / "eval.json", model_dir=model_dir)
        version = tracker.register_model(model_dir, f"bubogpt-{args.preset}")
        log(f"registered model bubogpt-{args.preset} version {version}")
        status = "FINISHED"
    finally:
        if status != "FINISHED":
            for run_id in locals().get("stage_runs", {}).values():
                tracker.end_run(run_id, status="FAILED")
        tracker.end_run(status=status)
    return 0


def main(argv: list[str] | None = None) -> int:
    from workflows.cli import add_train_arguments

    parser = argparse.ArgumentParser(prog="bubogpt train")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_training(args)
    except (TrainJobError, TrainConfigError) as err:
        print(f"bubogpt train: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
