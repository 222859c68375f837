"""Experiment tracking for `bubogpt train` / `bubogpt eval`: MLflow behind a small interface.

Only the driver and the rank-0 training worker ever log; every other rank gets a `NullTracker`.

    job run (parent)          flattened job config as params; tags: git commit, Ray job id,
                              preset; the prepared corpus as its dataset input (`log_input`);
                              system metrics (CPU, memory, disk, network, GPU) of the rank-0
                              worker's node while it trains; eval metrics; final artifacts
      stage run (nested)      one per stage: flattened TrainConfig, per-step metrics (loss, lr,
                              samples_per_s, tokens_per_s), loss-curve PNG, sample generations
      eval run (nested)       the evaluation of the exported model: its metrics and eval.json,
                              tagged with the training run and the registered model version
    registered model          one version per job, its source the exported model artifact; the
                              alias `newest` moves to each new version ("latest" is reserved by
                              MLflow: `models:/NAME/latest` already means the highest version)

The tracking URI comes from `--tracking-uri`, else `MLFLOW_TRACKING_URI`, else a local store in the
output folder. That local store is SQLite (`OUT/mlflow.db`, artifacts in `OUT/mlartifacts`): MLflow 3
keeps its plain-file store in maintenance mode and refuses it unless opted in.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

EXPERIMENT = "bubogpt"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
NEWEST_ALIAS = "newest"  # moved to each new registered version
SYSTEM_METRICS_INTERVAL_S = 5


def resolve_tracking_uri(flag: str | None, out_dir: str | Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None to let the server decide)."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / 'mlflow.db'}", (out / "mlartifacts").as_uri()


class NullTracker:
    """Tracks nothing: for ranks other than 0 and for runs without tracking."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any], run_id: str | None = None) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, run_id: str | None = None) -> None:
        pass

    def log_step_metrics(self, rows: Sequence[tuple], run_id: str | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, run_id: str | None = None) -> None:
        pass

    def log_text(self, text: str, name: str, run_id: str | None = None) -> None:
        pass

    def start_stage(self, stage: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> str | None:
        return None

    def end_run(self, run_id: str | None = None, status: str = "FINISHED") -> None:
        pass

    def register_model(self, model_dir: str | Path, name: str, run_id: str | None = None) -> str | None:
        return None


class MlflowTracker(NullTracker):
    """One MLflow job run; `start_stage` opens nested runs. Works through `MlflowClient` only (no
    global active run), so the Ray worker can attach to a run the driver created by its id."""

    def __init__(self, tracking_uri: str, run_id: str, experiment_id: str | None = None):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.experiment_id = experiment_id or self.client.get_run(run_id).info.experiment_id

    @classmethod
    def start_job(
        cls, tracking_uri: str, run_name: str, params: Mapping[str, Any], artifact_location: str | None = None,
        experiment: str = EXPERIMENT, tags: Mapping[str, str] | None = None,
    ) -> "MlflowTracker":
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id if found is not None
            else client.create_experiment(experiment, artifact_location=artifact_location)
        )  # fmt: skip
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
        tracker = cls(tracking_uri, run.info.run_id, experiment_id)
        tracker.log_params(params)
        return tracker

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str) -> "MlflowTracker":
        """Log into an existing run (the Ray worker's side)."""
        return cls(tracking_uri, run_id)

    def start_stage(self, stage: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> str:
        """A run nested in the job run (a stage, or the evaluation)."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        run = self.client.create_run(self.experiment_id, run_name=stage, tags={MLFLOW_PARENT_RUN_ID: self.run_id, **(tags or {})})
        self.log_params(params, run.info.run_id)
        return run.info.run_id

    def log_input(self, manifest: Mapping[str, Any], location: str, context: str = "training") -> None:
        """The prepared corpus as the run's dataset input (MLflow's dataset lineage): its location,
        and a digest of its manifest, which changes whenever its rows do."""
        import hashlib
        import json
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        with warnings.catch_warnings():  # a local path matches two of MLflow's source kinds, both local
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(location)
        digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
        dataset = MetaDataset(source, name=Path(location.rstrip("/")).name, digest=digest)._to_mlflow_entity()
        self.client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])

    def system_metrics(self):
        """A started monitor logging this node's system metrics (system/*) into the job run every
        few seconds; call `.finish()` on it."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                       tracking_uri=self.tracking_uri)  # fmt: skip
        monitor.start()
        return monitor

    def log_params(self, params: Mapping[str, Any], run_id: str | None = None) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id or self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, run_id: str | None = None) -> None:
        self.log_step_metrics([(step or 0, metrics)], run_id)

    def log_step_metrics(self, rows: Sequence[tuple], run_id: str | None = None) -> None:
        """Many steps' metrics in few requests: [(step, {name: value}[, time measured (s)])], each
        stamped with the time it was measured (else now)."""
        from mlflow.entities import Metric

        now = time.time()
        metrics = [
            Metric(k, float(v), int((row[2] if len(row) > 2 else now) * 1000), int(row[0]))
            for row in rows for k, v in row[1].items() if v is not None
        ]  # fmt: skip
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(run_id or self.run_id, metrics=metrics[start:start + 1000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, run_id: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id or self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id or self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str, run_id: str | None = None) -> None:
        self.client.log_text(run_id or self.run_id, text, name)

    def end_run(self, run_id: str | None = None, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id or self.run_id, status=status)

    def register_model(self, model_dir: str | Path, name: str, run_id: str | None = None) -> str:
        """Log `model_dir` as the run's `model` artifact, register it as a new version of `name` and
        move the `newest` alias to it."""
        run_id = run_id or self.run_id
        self.log_artifact(model_dir, "model", run_id)
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException:
            pass  # already registered: add a version
        source = f"{self.client.get_run(run_id).info.artifact_uri}/model"
        version = self.client.create_model_version(name, source=source, run_id=run_id)
        self.client.set_registered_model_alias(name, NEWEST_ALIAS, version.version)
        return version.version

    def tag_model_version(self, name: str, version: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value)


def job_tags(preset: str, ray_job_id: str) -> dict[str, str]:
    """The job run's tags: the preset, the Ray job id and the git commit of this code (when it runs
    from a git checkout), under MLflow's own key for it, which its UI shows as the source version."""
    from mlflow.utils.git_utils import get_git_commit
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    tags = {"preset": preset, "ray.job_id": ray_job_id}
    commit = get_git_commit(str(Path(__file__).resolve().parent))
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def loss_curve_png(history: Sequence[tuple[int, float]], path: str | Path, title: str) -> Path:
    """A loss-vs-step plot (matplotlib when installed, else drawn with PIL)."""
    path = Path(path)
    steps = [s for s, _ in history]
    losses = [v for _, v in history]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(6, 4))
        axes.plot(steps, losses, linewidth=1)
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
    except ImportError:
        _loss_curve_pil(steps, losses, path, title)
    return path


def _loss_curve_pil(steps: list[int], losses: list[float], path: Path, title: str) -> None:
    from PIL import Image, ImageDraw

    width, height, margin = 600, 400, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 10), title, fill="black")
    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    if len(steps) >= 2:
        low, high = min(losses), max(losses)
        span_x, span_y = max(steps[-1] - steps[0], 1), max(high - low, 1e-9)
        points = [
            (margin + (s - steps[0]) / span_x * (width - 2 * margin),
             height - margin - (v - low) / span_y * (height - 2 * margin))
            for s, v in zip(steps, losses)
        ]  # fmt: skip
        draw.line(points, fill="blue", width=2)
    image.save(path)
