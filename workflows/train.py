"""`bubogpt train`: the BuboGPT stages on Ray Train, tracked in MLflow.

    bubogpt train --data PREPARED --out OUT --stage NAME[,NAME...]|all --preset tiny|7b|13b
                  [--config FILE] [--max-steps N] [--num-workers N] [--tracking-uri URI]
                  [--deepspeed zero2|zero3] [--init MODEL_DIR] [--storage URI] [--data-mode memory|stream]

The recipe -- stages, what each trains, optimiser, the step loop -- is `bubogpt/training/recipe.py`.
This file is the Ray glue. The driver starts one `TorchTrainer.fit()` for the whole job (one
worker-group start, not one per stage); each worker runs `train_func`, which

    1. loads the model: the run's latest checkpoint when there is one (`ray.train.get_checkpoint()`:
       after a worker failure, or when the same job is run again), else the job's starting model;
       stage k+1 continues from the model stage k ended with, and each stage end is a checkpoint;
    2. builds the batch sources from its Ray Data shard (`workflows/streams.py`): "memory" mode (the
       tiny preset's default) reads the rows once per worker, "stream" (7b/13b's default) iterates
       a shard per dataset and epoch; resuming puts every stream back where the checkpoint left it;
    3. builds the stepper: DDP (`ray.train.torch.prepare_model`) or DeepSpeed ZeRO-2/3
       (`workflows/deepspeed_stepper.py`; gloo on CPU, so it runs anywhere);
    4. runs `bubogpt.training.train`, whose checkpoints (whole model in safetensors + config,
       optimiser, step, each rank's stream positions; written atomically) go to Ray Train's storage
       through `ray.train.report`.

The driver builds no model: the starting model, the sample generations, the export (with the LoRA
merge) and the evaluation run as Ray tasks with a training worker's resources (a GPU with --use-gpu).

Jobs, reruns and storage. Each job is one Ray Train run named after its stages (`job_name`:
"train-stage1", "train-stage2", "train-stage1-stage2" for --stage all) in
the storage (`--storage`: any pyarrow filesystem URI, default OUT/ray; `workflows/run_storage.py`).
Running the same command again is Ray Train V2's restore: the same `RunConfig(name, storage_path)`
finds the run's snapshot, and the workers continue from its latest checkpoint (a job that finished
only redoes the export). A job of a later stage (`--stage stage2` after a `--stage stage1` job on the
same OUT, as the RayJobs in cluster/kuberay run them) is a run of its own, so it never takes the
earlier job's snapshot for its own: it starts from the earlier stage's final checkpoint that
OUT/stages.json records.

Output folder:

    OUT/init/               the starting model (tiny: built by a task; 7b/13b: a copy of --init)
    OUT/ray/<run>/          Ray Train's storage (unless --storage): <stage>_step_<N>/ checkpoints
    OUT/stages.json         each stage's final checkpoint (local path or URI), over all jobs on OUT
    OUT/model/              the exported final model (`save_model` layout; what serving loads)
    OUT/eval.json           evaluation of the final model on the held-out splits
    OUT/progress/           rank<N>.json: pid, stage and step of each worker (monitoring); with
                            BUBOGPT_SAMPLE_LOG=1 also samples-rank<N>.jsonl: the row ids of every step
    OUT/run.json            MLflow tracking URI, job run id and stage run ids
    OUT/mlflow.db, mlartifacts/   the local tracking store when no tracking URI is given
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
from bubogpt.checkpoints.training_state import (
    MODEL_DIR,
    STATE_FILE,
    TrainState,
    load_optimizer_state,
    read_model,
    read_state,
    read_stream_positions,
)
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
from workflows.data.prepared import DATASETS, is_uri, read_manifest, shard_paths
from workflows.model_dirs import build_initial_model, check_initial_model, export_model, precomputed_tokens_match
from workflows.options import TrainOptions
from workflows.run_storage import RunStorage, local_folder

RUN_PREFIX = "train"  # Ray Train run names: train-<stage>[-<stage>...]
STAGES_FILE = "stages.json"
RUN_FILE = "run.json"  # the MLflow run ids of the job and of its stages
PROGRESS_DIR = "progress"  # per-rank progress files (step, pid): for monitoring and the fault tests
SAMPLE_LOG_ENV = "BUBOGPT_SAMPLE_LOG"  # "1": record the row ids of every step in OUT/progress


class TrainJobError(ValueError):
    """The training job cannot start: bad arguments, missing data or starting model."""


def log(message: str) -> None:
    # sys.stdout.write, not print: in a Ray Train worker, print() also goes through a logger that
    # prints it a second time.
    sys.stdout.write(f"[bubogpt train] {message}\n")
    sys.stdout.flush()


def job_name(configs: list[TrainConfig]) -> str:
    """The Ray Train run of a job: the same for every rerun of the job on the same storage, and
    different for jobs of different stages, so a stage-2 job never restores a stage-1 job's run."""
    return "-".join([RUN_PREFIX, *(c.stage for c in configs)])


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


def _sample_logger(out_dir: str, rank: int):
    """A `batch_taken` callback appending {stage, step, dataset, ids, pid} lines to
    OUT/progress/samples-rank<N>.jsonl (a step a restart redoes appears again, later)."""
    path = Path(out_dir) / PROGRESS_DIR / f"samples-rank{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)

    def record(stage: str, step: int, dataset: str, ids: list[str]) -> None:
        with open(path, "a") as file:
            file.write(json.dumps({"stage": stage, "step": step, "dataset": dataset, "ids": ids, "pid": os.getpid()}) + "\n")

    return record


def _registered_state(checkpoint) -> TrainState:
    """The state of a checkpoint Ray Train registered, read through its filesystem (no download)."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_FILE}") as stream:
        return TrainState.from_json(stream.read().decode("utf-8"))


def _load_checkpoint(loop_config: dict[str, Any], stages: list[TrainConfig], worker: Worker):
    """(model, Resume or None): the run's latest checkpoint, else the job's starting model.

    `get_checkpoint()` is the latest checkpoint Ray Train registered for this run (within this
    `fit()`, or restored from the run's snapshot in storage when the job runs again). A report the
    controller had not yet collected when a worker or the driver died is lost to it, though its
    folder is complete in storage: take whichever is further along."""
    import ray.train

    from workflows.deepspeed_stepper import engine_checkpoint_copy

    storage = RunStorage(loop_config["storage"])
    order = [c.stage for c in stages]
    checkpoint = ray.train.get_checkpoint()
    stored = latest_job_checkpoint(storage, loop_config["run"], stages)
    if stored is not None:
        ours = storage.read_state(stored)
        theirs = _registered_state(checkpoint) if checkpoint is not None else None
        if theirs is None or (order.index(ours.stage), ours.step) > (order.index(theirs.stage), theirs.step):
            checkpoint = ray.train.Checkpoint(stored, filesystem=storage.filesystem)
    if checkpoint is None:
        with local_folder(loop_config["start"]) as folder:
            return read_model(folder), None
    with checkpoint.as_directory() as directory:
        directory = Path(directory)
        resume = Resume(read_state(directory), load_optimizer_state(directory), engine_checkpoint_copy(directory),
                        read_stream_positions(directory, worker.rank, worker.world))  # fmt: skip
        return read_model(directory / MODEL_DIR), resume


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
    if loop_config["data_mode"] == "memory":
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

    # The node's CPU, memory, disk, network (and GPU) while it trains, into the job run.
    monitor = tracker.system_metrics() if tracker else None
    try:
        _train_on_worker(loop_config, stages, worker, tracker, stage_runs)
    finally:
        if monitor is not None:
            monitor.finish()


def _train_on_worker(loop_config: dict[str, Any], stages: list[TrainConfig], worker: Worker, tracker,
                     stage_runs: dict[str, str]) -> None:  # fmt: skip
    model, resume = _load_checkpoint(loop_config, stages, worker)
    if resume is not None and worker.rank == 0:
        log(f"resuming from the checkpoint of {resume.state.stage} at step {resume.state.step}")
    callbacks = Callbacks(
        checkpoint=_report_checkpoint,
        log=log,
        metrics=(lambda stage, rows: tracker.log_step_metrics(rows, stage_runs[stage])) if tracker else None,
        step_started=lambda stage, step, first: _write_progress(loop_config["out_dir"], worker.rank, stage, step, first),
        batch_taken=_sample_logger(loop_config["out_dir"], worker.rank) if loop_config.get("sample_log") else None,
    )
    train(model, stages, _streams_factory(loop_config, worker.rank), _stepper_factory(loop_config, worker), callbacks,
          worker, resume, use_precomputed_tokens=loop_config.get("precomputed_tokens_match", False))  # fmt: skip


# ==================================================================================================
# Driver side
# ==================================================================================================


def _training_datasets(data_dir: str | Path, configs: list[TrainConfig], data_mode: str, seed: int) -> dict[str, Any]:
    """memory: one dataset "train" with every training row the stages use (each worker reads all of
    it); stream: one dataset per corpus set, split across the workers, its blocks in a seeded order
    (the same in every run, so that a resumed stream finds its rows where it left them)."""
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
    if data_mode == "memory":
        return {"train": ray.data.read_parquet([p for name in names for p in paths[name]])}
    return {name: ray.data.read_parquet(paths[name]).randomize_block_order(seed=seed) for name in names}


def _data_config(data_mode: str):
    """memory: every worker reads every row (and samples its own batches); stream: the datasets are
    split across the workers, in order (`preserve_order`: positions mean the same rows on a rerun)."""
    import ray.train

    if data_mode == "memory":
        return ray.train.DataConfig(datasets_to_split=[])
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(datasets_to_split="all", execution_options=options)


def latest_job_checkpoint(storage: RunStorage, run: str, configs: list[TrainConfig]) -> str | None:
    """The furthest complete checkpoint of a run of these stages (stage order first, then step)."""
    found = storage.checkpoints(run)
    for config in reversed(configs):
        if found.get(config.stage):
            return found[config.stage][-1][1]
    return None


def run_job(configs: list[TrainConfig], data_dir: str | Path, out_dir: Path, start: str, manifest: dict,
            options: TrainOptions, storage: RunStorage, data_mode: str, tokens_match: bool,
            tracking: dict[str, Any] | None) -> dict[str, str]:  # fmt: skip
    """Every stage in one `TorchTrainer.fit()` (one worker group start); returns each stage's final
    checkpoint (paths in the storage). A rerun restores the run from its snapshot in storage."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    run = job_name(configs)
    previous = latest_job_checkpoint(storage, run, configs)
    if previous is not None:
        state = storage.read_state(previous)
        log(f"run {run} has a checkpoint of {state.stage} at step {state.step} in {storage.uri(previous)}: continuing from it")
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "stages": [c.to_dict() for c in configs],
            "start": start,
            "manifest": manifest,
            "out_dir": str(out_dir),
            "storage": storage.location,
            "run": run,
            "deepspeed": options.deepspeed,
            "tracking": tracking,
            "data_mode": data_mode,
            "threads_per_worker": max(1, int(options.cpus_per_worker)),
            "precomputed_tokens_match": tokens_match,
            "sample_log": os.environ.get(SAMPLE_LOG_ENV) == "1",
        },
        torch_config=TorchConfig(backend="nccl" if options.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=options.num_workers, use_gpu=options.use_gpu,
            resources_per_worker={"CPU": options.cpus_per_worker},
        ),  # fmt: skip
        run_config=ray.train.RunConfig(
            name=run,
            storage_path=storage.root,
            storage_filesystem=storage.filesystem,
            failure_config=ray.train.FailureConfig(max_failures=options.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),  # stage ends are kept
        ),
        datasets=_training_datasets(data_dir, configs, data_mode, configs[0].seed),
        dataset_config=_data_config(data_mode),
    )
    log(f"stages {[c.stage for c in configs]} on {options.num_workers} worker(s)"
        + (f", DeepSpeed {options.deepspeed}" if options.deepspeed else ", DDP")
        + f", run {run} in {storage.location}")  # fmt: skip
    trainer.fit()  # raises ray.train.TrainingFailedError when the failures exceed max_failures
    found = storage.checkpoints(run)
    finals = {}
    for config in configs:
        ends = [path for step, path in found.get(config.stage, []) if step == config.max_steps]
        if not ends:
            raise TrainJobError(f"{config.stage}: no checkpoint at its last step {config.max_steps} in {storage.uri(storage.path(run))}")
        finals[config.stage] = ends[-1]
    return finals


def recorded_stages(out_dir: Path) -> dict[str, str]:
    """OUT/stages.json: {stage: its final checkpoint (local path or URI)}, over every job on OUT."""
    path = out_dir / STAGES_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _record_stages(out_dir: Path, finals: dict[str, str]) -> None:
    merged = {**recorded_stages(out_dir), **finals}
    tmp = out_dir / f".{STAGES_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(merged, indent=2))
    os.replace(tmp, out_dir / STAGES_FILE)


def _job_start(options: TrainOptions, configs: list[TrainConfig], overrides: dict, out_dir: Path,
               init_dir: Path) -> tuple[str, list[TrainConfig]]:  # fmt: skip
    """(the location of the job's starting model folder, the recipe's stages before the job's).

    A job that starts at a later stage (e.g. --stage stage2, after a --stage stage1 job on this OUT)
    starts from the final checkpoint of the stage before it, as OUT/stages.json records it; with
    --init, or when no earlier job recorded that stage, from OUT/init."""
    recipe = resolve_stages(options.preset, "all", overrides)
    order = [c.stage for c in recipe]
    before = recipe[: order.index(configs[0].stage)]
    if options.init is not None or not before:
        return str(init_dir), []
    recorded = recorded_stages(out_dir).get(before[-1].stage)
    if recorded is None:
        log(f"no final checkpoint of {before[-1].stage} recorded in {out_dir / STAGES_FILE}: starting from {init_dir}")
        return str(init_dir), []
    storage = RunStorage(recorded)
    state = storage.complete_state(storage.root)
    if state is None:
        raise TrainJobError(f"{out_dir / STAGES_FILE} names {recorded} as {before[-1].stage}'s end, which is not a complete checkpoint")
    log(f"starting from {before[-1].stage}'s final checkpoint {recorded} (step {state.step})")
    return f"{recorded}/{MODEL_DIR}", before


def on_worker(options: TrainOptions, function, *args: Any, **kwargs: Any):
    """`function(*args, **kwargs)` as a Ray task with a training worker's resources (a GPU with
    --use-gpu): whatever loads a model runs there, never on the driver. Returns the ObjectRef."""
    import ray

    resources = {"num_cpus": options.cpus_per_worker, "num_gpus": 1 if options.use_gpu else 0}
    return ray.remote(function).options(name=f"bubogpt-{function.__name__}", max_retries=0, **resources).remote(*args, **kwargs)


def log_stage_artifacts(tracker, config: TrainConfig, state: TrainState, run_id: str) -> None:
    from workflows.tracking import loss_curve_png

    with tempfile.TemporaryDirectory() as tmp:
        png = loss_curve_png(state.loss_history, Path(tmp) / f"loss_{config.stage}.png", f"{config.stage}: training loss")
        tracker.log_artifact(png, None, run_id)
        config_path = Path(tmp) / "train_config.json"
        config_path.write_text(json.dumps(config.to_dict(), indent=2))
        tracker.log_artifact(config_path, None, run_id)
    tracker.log_metrics({"final_loss": state.loss_history[-1][1]}, config.max_steps, run_id)


def run_training(options: TrainOptions) -> int:
    import ray

    from workflows.evaluate import evaluate_model, log_evaluation, sample_generations
    from workflows.ray_connect import connect
    from workflows.tracking import NEWEST_ALIAS, MlflowTracker, job_tags, resolve_tracking_uri

    if options.data is None:
        raise TrainJobError("--data is required (a prepared corpus) for every stage but grounding")
    # The prepared corpus: a local folder or a pyarrow filesystem URI (s3://..., gs://...; Ray Data reads either).
    data_dir = str(options.data) if is_uri(options.data) else Path(options.data).resolve()
    out_dir = Path(options.out).resolve()
    manifest = read_manifest(data_dir)  # PreparedDataError when it is not a prepared corpus
    overrides = load_overrides(options.config) if options.config else {}
    configs = with_job_overrides(resolve_stages(options.preset, options.stage, overrides), options.max_steps, options.batch_size)
    data_mode = options.data_mode or ("memory" if options.preset == "tiny" else "stream")
    init = Path(options.init).resolve() if options.init else None
    check_initial_model(options.preset, out_dir, init)
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = RunStorage(options.storage or out_dir / "ray")
    connect(options.address)
    ray.data.DataContext.get_current().enable_progress_bars = False  # our own progress lines instead
    device = "cuda" if options.use_gpu else "cpu"

    init_dir = Path(ray.get(on_worker(options, build_initial_model, options.preset, out_dir, init, options.seed)))
    start, before = _job_start(options, configs, overrides, out_dir, init_dir)
    # Precomputed encoder tokens are usable when they came from the starting model's encoders, which
    # the earlier stages (a previous job's) left as they were.
    tokens_match = precomputed_tokens_match(manifest, init_dir) and not any(
        c.train_vision_encoder or c.train_audio_encoder for c in before
    )

    uri, artifact_location = resolve_tracking_uri(options.tracking_uri, out_dir)
    job_params = {"preset": options.preset, "stage": options.stage, "data": str(data_dir),
                  "num_workers": options.num_workers, "deepspeed": options.deepspeed or "none",
                  "stages": ",".join(c.stage for c in configs), "data_mode": data_mode,
                  "storage": storage.location}  # fmt: skip
    tracker = MlflowTracker.start_job(uri, f"{options.preset}-{options.stage}", job_params, artifact_location,
                                      tags=job_tags(options.preset, ray.get_runtime_context().get_job_id()))  # fmt: skip
    tracker.log_input(manifest, str(data_dir))
    log(f"MLflow run {tracker.run_id} at {uri}")
    status, stage_runs = "FAILED", {}
    try:
        tracker.log_params(flatten(json.loads((init_dir / CONFIG_FILE).read_text()), "model."))
        stage_runs = {c.stage: tracker.start_stage(c.stage, flatten(c.to_dict())) for c in configs}
        (out_dir / RUN_FILE).write_text(json.dumps({"tracking_uri": uri, "run_id": tracker.run_id, "stage_runs": stage_runs}, indent=2))
        started = time.time()
        finals = run_job(configs, data_dir, out_dir, start, manifest, options, storage, data_mode, tokens_match,
                         {"uri": uri, "run_id": tracker.run_id, "stage_runs": stage_runs})  # fmt: skip
        minutes = (time.time() - started) / 60
        log(f"training finished in {minutes:.1f} min (all stages, Ray start-up included)")
        _record_stages(out_dir, {stage: storage.uri(path) for stage, path in finals.items()})
        tracker.log_metrics({"train_minutes": minutes}, 0)
        samples = {
            config.stage: on_worker(options, sample_generations, f"{storage.uri(finals[config.stage])}/{MODEL_DIR}",
                                    data_dir, config, device=device)
            for config in configs if options.samples
        }  # fmt: skip
        for config in configs:
            log_stage_artifacts(tracker, config, storage.read_state(finals[config.stage]), stage_runs[config.stage])
            if config.stage in samples:
                tracker.log_text(json.dumps(ray.get(samples[config.stage]), indent=2), "sample_generations.json",
                                 stage_runs[config.stage])  # fmt: skip
            tracker.end_run(stage_runs[config.stage])
        model_dir = Path(ray.get(on_worker(options, export_model, storage.uri(finals[configs[-1].stage]), out_dir)))
        log(f"exported the final model to {model_dir}")
        name = f"bubogpt-{options.preset}"
        version = tracker.register_model(model_dir, name)
        log(f"registered model {name} version {version} (alias {NEWEST_ALIAS})")
        if options.eval:
            report = ray.get(on_worker(options, evaluate_model, model_dir, data_dir, limit=options.eval_limit, device=device))
            # A run of its own, linked to the training run (nested in it) and to the model version.
            eval_run = tracker.start_stage("eval", {"model": f"models:/{name}/{version}"},
                                           tags={"training_run_id": tracker.run_id, "model_version": f"{name}/{version}"})  # fmt: skip
            evaluation = log_evaluation(report, tracker, out_dir / "eval.json", run_id=eval_run, model_dir=model_dir)
            tracker.end_run(eval_run)
            tracker.log_metrics({f"eval_{k}": v for k, v in evaluation["metrics"].items()}, 0)  # beside the job's own
            tracker.tag_model_version(name, version, {"eval_run_id": eval_run})
        status = "FINISHED"
    finally:
        if status != "FINISHED":
            for run_id in stage_runs.values():
                tracker.end_run(run_id, status="FAILED")
        tracker.end_run(status=status)
    return 0
