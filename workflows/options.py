"""Typed options of each job. `workflows/cli.py` parses a command line into one of these and calls
the job's function with it; the quickstart, benchmarks and tests build them directly. The defaults
here are the command line's defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SynthOptions:
    out: Path
    seed: int = 0
    size: str = "small"  # tiny | small | medium


@dataclass
class PrepareOptions:
    input: Path  # folder holding corpus.json
    out: str | Path  # output folder or URI (s3://..., gs://...), new or empty, or a previous output with `overwrite`
    address: str | None = None  # Ray cluster (default: a local Ray)
    preset: str = "tiny"
    features_model: Path | None = None  # also store frozen encoder tokens
    overwrite: bool = False
    workers: int | None = None  # preprocessing actors (default: the cluster's free CPUs)
    num_gpus: float = 0.0  # GPUs per actor


@dataclass
class TrainOptions:
    out: Path
    data: str | Path | None = None  # prepared corpus, a folder or a URI (s3://...); not used by --stage grounding
    stage: str = "all"  # stage1 | stage2 | a comma list | all | grounding
    preset: str = "tiny"
    config: Path | None = None  # JSON/YAML {stage: {field: value}}
    max_steps: int | None = None
    batch_size: int | None = None
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    deepspeed: str | None = None  # zero2 | zero3
    tracking_uri: str | None = None
    init: Path | None = None  # starting model directory (required for 7b/13b)
    address: str | None = None
    max_failures: int = 2
    seed: int = 0
    eval: bool = True
    eval_limit: int | None = None
    samples: bool = True
    data_mode: str | None = None  # memory | stream; default: memory for tiny, stream for 7b/13b
    storage: str | None = None  # Ray Train's checkpoints: a local path or a pyarrow URI (default OUT/ray)


@dataclass
class EvalOptions:
    model: Path
    data: Path
    json: Path | None = None
    compare: Path | None = None
    limit: int | None = None
    tracking_uri: str | None = None
    ray: bool = False  # generate with Ray Data map_batches
    address: str | None = None


@dataclass
class ServeOptions:
    model: str  # a model directory, or a registry model: models:/NAME@ALIAS, models:/NAME/VERSION (serve/registry.py)
    port: int = 8000
    host: str = "127.0.0.1"
    api_key_env: str | None = None
    metrics_port: int | None = None  # Ray's metrics export port: Prometheus series at http://HOST:PORT/metrics
    tracking_uri: str | None = None  # the registry of a models:/ model; None = $MLFLOW_TRACKING_URI
    model_cache: Path | None = None  # registry downloads; None = $BUBOGPT_MODEL_CACHE, else ~/.cache/bubogpt/models


@dataclass
class ConvertOptions:
    imagebind: Path
    eva: Path
    blip2: Path
    bubogpt: Path
    llm: Path
    out: Path
    minigpt4: Path | None = None
    dtype: str = "fp32"  # bf16 | fp16 | fp32: storage of the frozen encoders (the joiner stays fp32)
    copy_llm: bool = False
    num_heads: dict[str, int] = field(default_factory=dict)  # {"audio"|"vision"|"qformer": heads}
    overwrite: bool = False


@dataclass
class ConvertGroundingOptions:
    ram: Path
    gdino: Path
    sam: Path
    bert: Path
    out: Path
    ram_tags: Path | None = None
    ram_thresholds: Path | None = None
    ram_config: Path | None = None
    dtype: str = "fp32"
    overwrite: bool = False


@dataclass
class GroundOptions:
    image: Path
    text: str
    out: Path | None = None
    grounding: Path | None = None
    llm: Path | None = None


@dataclass
class QuickstartOptions:
    workdir: Path = Path("work/quickstart")
    size: str = "medium"
    seed: int = 0
    max_steps: int | None = None
    eval_limit: int | None = None
    port: int = 8000
    num_cpus: int = 4
    address: str | None = None
    stop: bool = False
