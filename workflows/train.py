"""`bubogpt train`: the BuboGPT stages on Ray Train, tracked in MLflow.

    bubogpt train --data PREPARED --out OUT --stage NAME|all --preset tiny|7b|13b
                  [--config FILE] [--max-steps N] [--num-workers N] [--tracking-uri URI]
                  [--deepspeed zero2|zero3] [--init MODEL_DIR]

The recipe -- stages, what each trains, optimiser, the step loop -- is `bubogpt/training/recipe.py`.
This file is the Ray glue. The driver starts one `TorchTrainer.fit()` for the whole job (one
worker-group start, not one per stage); each worker runs `train_func`, which

    1. loads the model: the job's latest checkpoint when Ray restarts the workers after a failure
       (`ray.train.get_checkpoint()`), else OUT/init (or --init); stage k+1 continues from the model
       stage k ended with, and each stage end is a checkpoint of its own;
    2. builds the batch sources from its Ray Data shard (`workflows/streams.py`): "memory" mode
       (default) reads the rows once per worker, "stream" iterates a shard per dataset and epoch;
    3. builds the stepper: DDP (`ray.train.torch.prepare_model`) or DeepSpeed ZeRO-2/3
       (`workflows/deepspeed_stepper.py`; gloo on CPU, so it runs anywhere);
    4. runs `bubogpt.training.train`, whose checkpoints (whole model in safetensors + config,
       optimiser, step; written atomically) go to Ray Train's storage through `ray.train.report`.

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

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bubogpt.checkpoints.native import CONFIG_FILE
from bubogpt.checkpoints.training_state import MODEL_DIR, is_complete, load_optimizer_state, read_model, read_state
from bubogpt.training import (
    Callbacks,
    Resume,
    TorchStepper,
    TrainConfig,
    Worker,
    flatten,
    load_overrides,
    mixes_modalities,
    resolve_stages,
    train,
    with_job_overrides,
)
from workflows.data.prepared import DATASETS, read_manifest, shard_paths
from workflows.model_dirs import build_initial_model, export_model, precomputed_tokens_match
from workflows.options import TrainOptions

JOB_NAME = "train"  # Ray Train run name under OUT/ray
STAGES_FILE = "stages.json"
RUN_FILE = "run.json"  # the MLflow run ids of the job and of its stages
PROGRESS_DIR = "progress"  # per-rank progress files (step, pid): for monitoring and the fault test
TEXT_COLUMNS = ["dataset", "split", "id", "instruction", "answer", "meta"]


class TrainJobError(ValueError):
    """The training job cannot start: bad arguments, missing data or starting model."""


def log(message: str) -> None:
    # sys.stdout.write, not print: in a Ray Train worker, print() also goes through a logger that
    # prints it a second time.
    sys.stdout.write(f"[bubogpt train] {message}\n")
    sys.stdout.flush()


# ==================================================================================================
# Worker side
# ==================================================================================================


def _write_progress(out_dir: str, rank: int, stage: str, step: int, resumed_from: int) -> None:
    folder = Path(out_dir) / PROGRESS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".rank{rank}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"pid": os.getpid(), "stage": stage, "step": step, "resumed_from": resumed_from,
                               "time": time.time()}))  # fmt: skip
    os.replace(tmp, folder / f"rank{rank}.json")


def _further(stored: Path, registered, stages: list[TrainConfig]) -> bool:
    """Is the stored checkpoint further along (stage order, then step) than the registered one?"""
    order = [c.stage for c in stages]
    with registered.as_directory() as directory:
        theirs = read_state(directory)
    ours = read_state(stored)
    return (order.index(ours.stage), ours.step) > (order.index(theirs.stage), theirs.step)


def _load_checkpoint(loop_config: dict[str, Any], stages: list[TrainConfig]):
    """(model, Resume or None): the job's latest checkpoint, else the starting model.

    `get_checkpoint()` is the last checkpoint the controller registered; a report it had not yet
    collected when a worker died is lost to it, though its folder is complete in storage: take
    whichever is further along."""
    import ray.train

    from workflows.deepspeed_stepper import engine_checkpoint_copy

    checkpoint = ray.train.get_checkpoint()
    stored = latest_job_checkpoint(Path(loop_config["storage"]), stages)
    if stored is not None and (checkpoint is None or _further(stored, checkpoint, stages)):
        checkpoint = ray.train.Checkpoint.from_directory(str(stored))
    if checkpoint is None:
        return read_model(loop_config["init_dir"]), None
    with checkpoint.as_directory() as directory:
        resume = Resume(read_state(directory), load_optimizer_state(directory), engine_checkpoint_copy(Path(directory)))
        return read_model(Path(directory) / MODEL_DIR), resume


def _stepper_factory(loop_config: dict[str, Any], worker: Worker):
    """DDP through Ray Train (`prepare_model`), or a DeepSpeed engine."""
    import ray.train.torch

    zero_stage = {"zero2": 2, "zero3": 3}.get(loop_config.get("deepspeed") or "", 0)
    on_gpu = worker.device.type == "cuda"

    def make_stepper(model, optimizer, scheduler, config: TrainConfig):
        if zero_stage:
            from workflows.deepspeed_stepper import DeepSpeedStepper

            return DeepSpeedStepper(model, optimizer, scheduler, config, zero_stage, worker.rank, on_gpu)
        wrapped = ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": mixes_modalities(config)}
        )
        scaler = torch.amp.GradScaler("cuda") if on_gpu and config.precision == "fp16" else None
        return TorchStepper(wrapped, optimizer, scheduler, config.grad_accum_steps, config.grad_clip, worker.rank, scaler)

    return make_stepper


def _streams_factory(loop_config: dict[str, Any], rank: int):
    """{dataset: stream} for a stage, from this worker's Ray Data shards."""
    import ray.train

    from workflows.streams import InMemoryData, ShardStream

    manifest = loop_config["manifest"]
    if loop_config.get("data_mode", "memory") == "memory":
        data = InMemoryData(ray.train.get_dataset_shard("train"), manifest)
        if rank == 0:
            log("loaded the training rows: " + ", ".join(f"{k} {t.num_rows}" for k, t in sorted(data.tables.items())))
        return lambda config: {name: data.stream(name, config.batch_size, config.seed + 7919 * rank) for name in config.datasets}
    return lambda config: {
        name: ShardStream(name, ray.train.get_dataset_shard(name), config.batch_size, manifest, config.seed + 7919 * rank)
        for name in config.datasets
    }


def _report_checkpoint(name: str, write, metrics: dict[str, Any]) -> None:
    """Write this rank's part of the checkpoint in a temporary folder and report it to Ray Train,
    which copies it into the run's storage."""
    import ray.train

    local = Path(tempfile.mkdtemp(prefix=f"bubogpt-ckpt-{name}-"))
    try:
        write(local / name)
        written = (local / name).is_dir()
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(local / name)) if written else None,
                         checkpoint_dir_name=name)  # fmt: skip
    finally:
        shutil.rmtree(local, ignore_errors=True)


def train_func(loop_config: dict[str, Any]) -> None:
    """All stages of the job on one Ray Train worker (see the module docstring)."""
    import ray
    import ray.train
    import ray.train.torch

    stages = [TrainConfig.from_dict(d) for d in loop_config["stages"]]
    context = ray.train.get_context()
    worker = Worker(ray.train.torch.get_device(), context.get_world_rank(), context.get_world_size())
    torch.set_num_threads(loop_config.get("threads_per_worker", 1))
    # Where each worker runs, in the job's output (multi-node checks read it).
    sys.stdout.write(f"bubogpt train worker rank {worker.rank}/{worker.world} on node "
                     f"{ray.get_runtime_context().get_node_id()}\n")  # fmt: skip
    sys.stdout.flush()

    tracker, stage_runs = None, (loop_config.get("tracking") or {}).get("stage_runs", {})
    if worker.rank == 0 and loop_config.get("tracking"):
        from workflows.tracking import MlflowTracker

        tracker = MlflowTracker.attach(loop_config["tracking"]["uri"], loop_config["tracking"]["run_id"])

    model, resume = _load_checkpoint(loop_config, stages)
    if resume is not None and worker.rank == 0:
        log(f"resuming from the checkpoint of {resume.state.stage} at step {resume.state.step}")
    callbacks = Callbacks(
        checkpoint=_report_checkpoint,
        log=log,
        metrics=(lambda stage, rows: tracker.log_step_metrics(rows, stage_runs[stage])) if tracker else None,
        step_started=lambda stage, step, first: _write_progress(loop_config["out_dir"], worker.rank, stage, step, first),
    )
    train(model, stages, _streams_factory(loop_config, worker.rank), _stepper_factory(loop_config, worker), callbacks,
          worker, resume, use_precomputed_tokens=loop_config.get("precomputed_tokens_match", False))  # fmt: skip


# ==================================================================================================
# Driver side
# ==================================================================================================


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


def run_job(configs: list[TrainConfig], data_dir: Path, out_dir: Path, init_dir: Path, manifest: dict,
            options: TrainOptions, tracking: dict[str, Any] | None) -> dict[str, Path]:  # fmt: skip
    """Every stage in one `TorchTrainer.fit()` (one worker group start); returns each stage's final
    checkpoint. Resumes from the furthest checkpoint already in OUT/ray when rerun."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    storage = out_dir / "ray"
    previous = latest_job_checkpoint(storage / JOB_NAME, configs)
    if previous is not None:
        state = read_state(previous)
        log(f"found a checkpoint of {state.stage} at step {state.step} in {previous}: resuming from it")
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
            "data_mode": options.data_mode,
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
        datasets=_training_datasets(data_dir, configs, options.data_mode),
        # memory mode: every worker reads every row (and samples its own batches)
        dataset_config=ray.train.DataConfig(datasets_to_split=[] if options.data_mode == "memory" else "all"),
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


def _stage_init(options: TrainOptions, configs: list[TrainConfig], overrides: dict, init_dir: Path) -> Path:
    """A job that starts at a later stage (e.g. --stage stage2) starts from --init, else from the
    previous stage's final checkpoint in the same OUT when there is one."""
    if options.init is not None or options.stage == "all":
        return init_dir
    order = [c.stage for c in resolve_stages(options.preset, "all", overrides)]
    before = order[: order.index(configs[0].stage)]
    if before:
        found = stage_checkpoints(Path(options.out).resolve() / "ray" / JOB_NAME).get(before[-1], [])
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


def run_training(options: TrainOptions) -> int:
    import ray

    from workflows.evaluate import sample_generations
    from workflows.ray_connect import connect
    from workflows.tracking import MlflowTracker, resolve_tracking_uri

    if options.data is None:
        raise TrainJobError("--data is required (a prepared corpus) for every stage but grounding")
    data_dir, out_dir = Path(options.data).resolve(), Path(options.out).resolve()
    manifest = read_manifest(data_dir)  # PreparedDataError when it is not a prepared corpus
    overrides = load_overrides(options.config) if options.config else {}
    configs = with_job_overrides(resolve_stages(options.preset, options.stage, overrides), options.max_steps, options.batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    init = Path(options.init).resolve() if options.init else None
    init_dir = _stage_init(options, configs, overrides, build_initial_model(options.preset, out_dir, init, options.seed))
    connect(options.address)
    ray.data.DataContext.get_current().enable_progress_bars = False  # our own progress lines instead

    uri, artifact_location = resolve_tracking_uri(options.tracking_uri, out_dir)
    job_params = {"preset": options.preset, "stage": options.stage, "data": str(data_dir),
                  "num_workers": options.num_workers, "deepspeed": options.deepspeed or "none",
                  "stages": ",".join(c.stage for c in configs), "data_mode": options.data_mode}  # fmt: skip
    tracker = MlflowTracker.start_job(uri, f"{options.preset}-{options.stage}", job_params, artifact_location)
    log(f"MLflow run {tracker.run_id} at {uri}")
    status, stage_runs = "FAILED", {}
    try:
        tracker.log_params(flatten(json.loads((init_dir / CONFIG_FILE).read_text()), "model."))
        stage_runs = {c.stage: tracker.start_stage(c.stage, flatten(c.to_dict())) for c in configs}
        (out_dir / RUN_FILE).write_text(json.dumps({"tracking_uri": uri, "run_id": tracker.run_id, "stage_runs": stage_runs}, indent=2))
        started = time.time()
        finals = run_job(configs, data_dir, out_dir, init_dir, manifest, options,
                         {"uri": uri, "run_id": tracker.run_id, "stage_runs": stage_runs})  # fmt: skip
        minutes = (time.time() - started) / 60
        log(f"training finished in {minutes:.1f} min (all stages, Ray start-up included)")
        tracker.log_metrics({"train_minutes": minutes}, 0)
        for config in configs:
            log_stage_artifacts(tracker, config, finals[config.stage], stage_runs[config.stage])
            if options.samples:
                samples = sample_generations(finals[config.stage] / MODEL_DIR, data_dir, config)
                tracker.log_text(json.dumps(samples, indent=2), "sample_generations.json", stage_runs[config.stage])
            tracker.end_run(stage_runs[config.stage])
        (out_dir / STAGES_FILE).write_text(json.dumps({k: str(v) for k, v in finals.items()}, indent=2))
        model_dir = export_model(finals[configs[-1].stage], out_dir)
        log(f"exported the final model to {model_dir}")
        if options.eval:
            from workflows.evaluate import evaluate_model, log_evaluation

            report = evaluate_model(model_dir, data_dir, limit=options.eval_limit)
            log_evaluation(report, tracker, out_dir / "eval.json", model_dir=model_dir)
        version = tracker.register_model(model_dir, f"bubogpt-{options.preset}")
        log(f"registered model bubogpt-{options.preset} version {version}")
        status = "FINISHED"
    finally:
        if status != "FINISHED":
            for run_id in stage_runs.values():
                tracker.end_run(run_id, status="FAILED")
        tracker.end_run(status=status)
    return 0
