"""`bubogpt train --stage grounding`: train the tiny tagger, segmenter and detector with Ray Train.

The loops, losses, calibration and asset writing are plain PyTorch in
`bubogpt.grounding.training.train_tiny_grounding`; this file is the Ray glue: one `TorchTrainer`
worker runs it (the three models are small and trained one after another, so one worker with all
the node's threads beats splitting them), reports its log lines and final scores through
`ray.train.report`, and hands the assets back as a Ray checkpoint, which the driver copies to
`OUT/grounding_tiny/`.

Options (`TrainOptions`; only `out` is required, `data` is not used: scenes are drawn):
    out                 output folder
    seed                recipe seed (default 0)
    config              JSON of `GroundingTrainingConfig` fields to override, either at the top level
                        (bubogpt/assets/grounding_tiny/recipe.json) or under a "grounding" key
    address             Ray cluster address (default: start a local Ray)
    use_gpu             train on one GPU (default: False)
    cpus_per_worker     CPU threads for the worker (`bubogpt train` default 1; the shipped weights used 2)
`data_workers` (an argument): processes drawing scenes (default: 0; what is drawn does not depend on it)
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from workflows.options import TrainOptions


class GroundingJobError(ValueError):
    """A grounding training job that cannot start (unreadable or invalid config file)."""


def train_func(loop_config: dict[str, Any]) -> None:
    """Runs on the Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    from bubogpt.grounding.training import GroundingTrainingConfig, train_tiny_grounding

    torch.set_num_threads(loop_config["threads"])
    config = GroundingTrainingConfig.from_dict(loop_config["config"])
    device = ray.train.torch.get_device()
    rank_zero = ray.train.get_context().get_world_rank() == 0

    def log(phase: str, step: int, metrics: dict[str, float]) -> None:
        if rank_zero:  # sys.stdout.write: a worker's print() is printed twice (see workflows/train.py)
            sys.stdout.write(json.dumps({"phase": phase, "step": step, **{k: round(v, 5) for k, v in metrics.items()}}) + "\n")
            sys.stdout.flush()

    with tempfile.TemporaryDirectory() as scratch:
        scores = train_tiny_grounding(config, scratch, device, log)
        checkpoint = ray.train.Checkpoint.from_directory(Path(scratch) / "grounding_tiny")
        ray.train.report({f"validation_{k}": v for k, v in scores.items()}, checkpoint=checkpoint)


def read_overrides(path: str | Path | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise GroundingJobError(f"cannot read the config file {path}: {err.strerror or err}") from err
    except json.JSONDecodeError as err:
        raise GroundingJobError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise GroundingJobError(f"{path}: expected an object of GroundingTrainingConfig fields")
    return data.get("grounding", data)


def train_grounding(options: TrainOptions, data_workers: int = 0) -> dict[str, float]:
    """Train, then copy the assets to `options.out/grounding_tiny`; returns the validation scores."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from bubogpt.grounding.training import GroundingTrainingConfig
    from workflows.ray_connect import connect

    out = Path(options.out).resolve()
    overrides = read_overrides(options.config)
    try:
        config = GroundingTrainingConfig.from_dict({**overrides, "seed": options.seed, "data_workers": data_workers})
    except (TypeError, ValueError) as err:
        raise GroundingJobError(f"{options.config}: {err}") from err
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, int(options.cpus_per_worker or 2))
    connect(options.address, include_dashboard=False)
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"config": config.to_dict(), "threads": threads},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=options.use_gpu, resources_per_worker={"CPU": threads}),
        run_config=RunConfig(name="grounding", storage_path=str(out / "ray_results")),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    target = out / "grounding_tiny"
    if target.exists():
        shutil.rmtree(target)
    result.checkpoint.to_directory(str(target))
    scores = {k.removeprefix("validation_"): v for k, v in result.metrics.items() if k.startswith("validation_")}
    (out / "grounding_scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    return scores


def run_grounding_training(options: TrainOptions) -> int:
    """`bubogpt train --stage grounding`: prints the validation scores; exit code 0."""
    scores = train_grounding(options)
    print(json.dumps({"grounding_assets": str(Path(options.out) / "grounding_tiny"), "validation": scores}, indent=2))
    return 0
