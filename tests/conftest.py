"""Shared fixtures. Heavy ones (Ray, a trained tiny model) are session-scoped: built once."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    path = GOLDEN / "reference_tiny"
    if not path.is_dir():
        pytest.fail(f"golden fixtures missing at {path}")
    return path


# --- servers the tests start: a process on a free loopback port, stopped at the end ---


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def _server_process(command: list[str], health_url: str, log_path: Path, timeout_s: float):
    """Runs `command` (output to log_path) until health_url answers; yields; terminates it."""
    import subprocess
    import time
    import urllib.request

    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(health_url, timeout=5)
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                pytest.fail(f"{Path(command[0]).name} did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


# --- object storage: a real S3-API server (moto in server mode), for storage tests ---


@dataclass
class S3Server:
    endpoint_url: str  # http://127.0.0.1:<port>
    env: dict  # the variables set in os.environ: AWS_ENDPOINT_URL, dummy credentials, region

    def create_bucket(self, name: str) -> str:
        """Creates the bucket (3-63 lower-case letters, digits, dots, hyphens); returns "s3://<name>"."""
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint_url).create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """`moto_server` on a free loopback port, with AWS_ENDPOINT_URL, dummy credentials and a region
    set in os.environ for the session, so boto3, pyarrow (and Ray workers started after it, e.g. by
    `ray_session`, which requests this fixture) reach it as they would reach S3. Buckets:
    `s3_server.create_bucket(name)`; give each test its own bucket or prefix."""
    import sys

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)]
    log_path = tmp_path_factory.mktemp("s3_server") / "moto.log"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no probing for instance credentials
    }
    saved = {key: os.environ.get(key) for key in env}
    with _server_process(command, f"{endpoint}/moto-api/", log_path, timeout_s=120):
        os.environ.update(env)
        try:
            yield S3Server(endpoint, env)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


# --- Ray and the prepared tiny corpus (workflows/prepare.py), shared by data/training/serving tests ---


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole session (2 CPUs, no dashboard); a Ray already running is reused.
    Started after `s3_server`, so its workers inherit the object-storage endpoint and credentials.
    Its metrics agent exports Prometheus metrics on a free port (`bubogpt serve --metrics-port`'s
    option; the serving metrics test scrapes it: ray.nodes()[i]["MetricsExportPort"])."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, _metrics_export_port=_free_port())
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@dataclass
class PreparedCorpus:
    corpus_dir: Path  # synthetic corpus in the original formats (corpus_dir / "corpus.json")
    prepared_dir: Path  # `bubogpt data prepare` output (layout in workflows/data/prepared.py)
    manifest: dict


@pytest.fixture(scope="session")
def prepared_small_corpus(ray_session, tmp_path_factory) -> PreparedCorpus:
    """The "tiny" synthetic corpus (seed 0), prepared once per session with the tiny preset."""
    from bubogpt.data.synth import synthesize
    from workflows.prepare import run_prepare

    root = tmp_path_factory.mktemp("prepared_small_corpus")
    synthesize(root / "corpus", seed=0, size="tiny")
    manifest = run_prepare(root / "corpus", root / "prepared", preset="tiny", progress=False)
    return PreparedCorpus(root / "corpus", root / "prepared", manifest)


# --- the serving application (serve/app.py), started once and shared by tests/test_serve*.py ---


@pytest.fixture(scope="session")
def serve_app(ray_session, tmp_path_factory):
    """The Ray Serve application on a loopback port with a tiny model (tests/serve_harness.py)."""
    from serve_harness import start_app

    app, stop = start_app(tmp_path_factory.mktemp("serve_app"))
    yield app
    stop()


@pytest.fixture(scope="session")
def reference(serve_app):
    """The server's model directory, loaded here: what the server's answers must equal."""
    from bubogpt.checkpoints.native import load_model

    return load_model(serve_app.model_dir)


@pytest.fixture(scope="session")
def direct_grounding(serve_app):
    """The grounding pipeline from the server's weights, called directly: what the server's must equal."""
    from bubogpt.grounding.pipeline import load_grounding

    return load_grounding(serve_app.settings["grounding_dir"])


# --- training (workflows/train.py): a real MLflow server and ONE short training shared by all tests ---


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend, local artifact root) on a free loopback port."""
    import sys

    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    command = [
        str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    with _server_process(command, f"{uri}/health", root / "server.log", timeout_s=240):
        yield uri


@dataclass
class TrainedTinyModel:
    out_dir: Path  # `bubogpt train` output (layout in workflows/train.py)
    model_dir: Path  # the exported model (`save_model` layout): what serving loads
    prepared_dir: Path  # the corpus it was trained on
    tracking_uri: str
    run: dict  # OUT/run.json: {"run_id", "stage_runs": {stage: run id}, "tracking_uri"}
    steps: int  # optimiser steps of every stage
    models_built_on_driver: list[str]  # the stack of each BuboGPT built in this (the driver's) process


@pytest.fixture(scope="session")
def trained_tiny_model(ray_session, prepared_small_corpus, mlflow_server, tmp_path_factory) -> TrainedTinyModel:
    """All tiny stages, a few steps each, on the prepared tiny corpus, tracked on `mlflow_server`:
    `bubogpt train --stage all --max-steps 6`. Not a good model; a real one, trained the real way."""
    import json

    import traceback
    from unittest import mock

    from bubogpt.modeling_bubogpt import BuboGPT
    from workflows.options import TrainOptions
    from workflows.train import run_training

    out = tmp_path_factory.mktemp("trained_tiny_model") / "run"
    steps = 6
    options = TrainOptions(out=out, data=prepared_small_corpus.prepared_dir, stage="all", preset="tiny",
                           max_steps=steps, batch_size=4, tracking_uri=mlflow_server, eval_limit=4)  # fmt: skip
    # A guard in the driver process: every BuboGPT built here while the job runs is recorded (Ray's
    # workers and tasks are other processes, so what they build is not). The job's evaluation, sample
    # generations and export must all run there (tests/test_train_ray.py asserts the list is empty).
    built_on_driver: list[str] = []
    build = BuboGPT.__init__

    def recording_build(self, *args, **kwargs):
        built_on_driver.append("".join(traceback.format_stack(limit=12)))
        build(self, *args, **kwargs)

    with mock.patch.object(BuboGPT, "__init__", recording_build):
        assert run_training(options) == 0
    run = json.loads((out / "run.json").read_text())
    return TrainedTinyModel(out, out / "model", prepared_small_corpus.prepared_dir, mlflow_server, run, steps,
                            built_on_driver)  # fmt: skip
