"""The `bubogpt` command: parses a command line into a job's typed options (`workflows/options.py`)
and calls the job's function with them. Each subcommand imports its workflow only when it runs.

Nothing imports this module (tests/test_cli.py checks): the quickstart, benchmarks and tests call the
workflow functions with options they build.

User errors -- a missing or invalid prepared corpus, a bad config file, an unknown stage, an
unreachable Ray address -- end in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from workflows.options import (
    ConvertGroundingOptions,
    ConvertOptions,
    EvalOptions,
    GroundOptions,
    PrepareOptions,
    QuickstartOptions,
    ServeOptions,
    SynthOptions,
    TrainOptions,
)

# -- the commands ------------------------------------------------------------------------------------


def data_synth(options: SynthOptions) -> int:
    from bubogpt.data.synth import synthesize

    corpus = synthesize(options.out, seed=options.seed, size=options.size)
    print(json.dumps(corpus, indent=2))
    return 0


def log_info() -> None:
    """Show INFO logs (data preparation reports its progress and summary through `logging`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def data_prepare(options: PrepareOptions) -> int:
    from workflows.prepare import run_prepare

    log_info()
    manifest = run_prepare(
        options.input,
        options.out,
        preset=options.preset,
        address=options.address,
        features_model=options.features_model,
        overwrite=options.overwrite,
        workers=options.workers,
        num_gpus=options.num_gpus,
    )
    summary = {key: manifest[key] for key in ("preset", "shapes", "features", "counts")}
    print(json.dumps({**summary, "skipped": len(manifest["skipped"]), "out": str(options.out)}, indent=2))
    return 0


def serve(options: ServeOptions) -> int:
    from serve.local import run_local
    from workflows.ray_connect import check_reachable

    check_reachable()  # `serve run` would retry a dead address for ever
    return run_local(options.model, port=options.port, host=options.host, api_key_env=options.api_key_env,
                     metrics_port=options.metrics_port, tracking_uri=options.tracking_uri,
                     model_cache_dir=options.model_cache)  # fmt: skip


def ground(options: GroundOptions) -> int:
    from bubogpt.grounding.pipeline import load_grounding
    from bubogpt.grounding.result import annotate_image
    from bubogpt.preprocess import decode_image

    image = decode_image(options.image)
    matcher = None
    if options.llm is not None:
        from bubogpt.checkpoints.native import load_model
        from bubogpt.grounding.matcher import LLMMatcher

        matcher = LLMMatcher(load_model(options.llm))
    pipeline = load_grounding(options.grounding, matcher)
    result = pipeline.ground(image, options.text)
    out = options.out or Path(f"{Path(options.image).stem}_grounded.png")
    annotate_image(image, result.entities).save(out, format="PNG")
    print(json.dumps({**result.to_dict(), "annotated_png": str(out)}, indent=2))
    return 0


def train(options: TrainOptions) -> int:
    if options.stage == "grounding":  # draws its own scenes: no --data
        from workflows.train_grounding import run_grounding_training

        return run_grounding_training(options)
    from workflows.train import run_training

    return run_training(options)


def evaluate(options: EvalOptions) -> int:
    from workflows.evaluate import run_eval

    return run_eval(options)


def quickstart(options: QuickstartOptions) -> int:
    from workflows.quickstart import run_quickstart

    log_info()
    return run_quickstart(options)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user asked for something that cannot be done (imported after the
    fact: only modules a failed command already loaded are looked at)."""
    names = {
        "bubogpt.training.config": ["TrainConfigError"],
        "bubogpt.data.synth": ["SynthError"],
        "bubogpt.preprocess": ["MediaError"],
        "bubogpt.checkpoints.training_state": ["CheckpointError"],
        "workflows.data.prepared": ["PreparedDataError"],
        "workflows.prepare": ["PrepareError"],
        "workflows.train": ["TrainJobError"],
        "workflows.model_dirs": ["ModelDirError"],
        "workflows.train_grounding": ["GroundingJobError"],
        "workflows.ray_connect": ["RayConnectError"],
        "serve.settings": ["SettingsError"],
    }
    found: list[type[BaseException]] = [FileNotFoundError, NotADirectoryError, IsADirectoryError]
    for module, classes in names.items():
        if module in sys.modules:
            found += [getattr(sys.modules[module], name) for name in classes if hasattr(sys.modules[module], name)]
    return tuple(found)


# -- parsing -----------------------------------------------------------------------------------------


def _options(cls, args: argparse.Namespace):
    """The dataclass `cls` from the parsed arguments; options not given keep the dataclass default."""
    given = vars(args)
    return cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given})


def build_parser() -> argparse.ArgumentParser:
    """Options left out of a command line are absent from the namespace (`argparse.SUPPRESS`): their
    defaults are the dataclasses' (`workflows/options.py`)."""
    parser = argparse.ArgumentParser(prog="bubogpt", description="BuboGPT on Ray: data, training, evaluation, serving.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(parent, name: str, function, options_cls, **kwargs) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, argument_default=argparse.SUPPRESS, **kwargs)
        sub.set_defaults(func=function, options=options_cls)
        return sub

    data = commands.add_parser("data", help="build and prepare corpora").add_subparsers(dest="data_command", required=True)
    synth = command(data, "synth", data_synth, SynthOptions, help="write the synthetic multimodal corpus in the original formats")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--seed", type=int, help=f"default {SynthOptions.seed}")
    synth.add_argument("--size", choices=["tiny", "small", "medium"], help=f"default {SynthOptions.size}")

    prepare = command(data, "prepare", data_prepare, PrepareOptions,
                      help="preprocess a corpus (INPUT/corpus.json layout) into Parquet shards with Ray Data")  # fmt: skip
    prepare.add_argument("--input", type=Path, required=True, help="folder holding corpus.json")
    prepare.add_argument("--out", required=True, help="output folder or URI (s3://bucket/prefix, gs://...); new or empty")
    prepare.add_argument("--address", help="an existing Ray cluster (default: a local Ray)")
    prepare.add_argument("--preset", choices=["tiny", "7b", "13b"], help="image size and clips (default tiny)")
    prepare.add_argument("--features-model", type=Path, help="also store frozen encoder tokens")
    prepare.add_argument("--overwrite", action="store_true", help="replace a previous prepared output")
    prepare.add_argument("--workers", type=int, help="preprocessing actors (default: cluster CPUs)")
    prepare.add_argument("--num-gpus", type=float, help="GPUs per actor (features on GPU; default 0)")

    serve_ = command(commands, "serve", serve, ServeOptions,
                     help="run the Ray Serve application (serve/config.yaml) for a model directory")  # fmt: skip
    serve_.add_argument("--model", required=True,
                        help="a model directory (save_model / training output) or models:/NAME@ALIAS, models:/NAME/VERSION")
    serve_.add_argument("--port", type=int, help=f"default {ServeOptions.port}")
    serve_.add_argument("--host", help="listen address (default: loopback only)")
    serve_.add_argument("--api-key-env", help="environment variable holding the bearer token to require")
    serve_.add_argument("--metrics-port", type=int, help="Ray's metrics export port: Prometheus metrics at http://HOST:PORT/metrics")
    serve_.add_argument("--tracking-uri", help="the MLflow registry of a models:/ model (default: $MLFLOW_TRACKING_URI)")
    serve_.add_argument("--model-cache", type=Path,
                        help="registry models' download cache (default: $BUBOGPT_MODEL_CACHE, else ~/.cache/bubogpt/models)")

    from workflows import convert

    convert_ = command(commands, "convert", convert.run, ConvertOptions,
                       help="the released BuboGPT checkpoints -> a model directory")  # fmt: skip
    convert.add_arguments(convert_)
    convert_grounding = command(commands, "convert-grounding", convert.run_grounding, ConvertGroundingOptions,
                                help="RAM, Grounding DINO, SAM -> a grounding directory")  # fmt: skip
    convert.add_grounding_arguments(convert_grounding)

    ground_ = command(commands, "ground", ground, GroundOptions,
                      help="ground an answer in an image: entities, spans (JSON) and an annotated PNG")  # fmt: skip
    ground_.add_argument("image", type=Path, help="the image file")
    ground_.add_argument("--text", required=True, help="the answer whose mentions are linked to the image's entities")
    ground_.add_argument("--out", type=Path, help="annotated PNG (default: ./<image stem>_grounded.png)")
    ground_.add_argument("--grounding", type=Path,
                         help="tiny-layout weights or the released checkpoints (default: the shipped tiny models)")
    ground_.add_argument("--llm", type=Path, help="a model directory whose LLM links the spans (default: the deterministic matcher)")

    train_ = command(commands, "train", train, TrainOptions, help="train BuboGPT's stages on Ray Train (tracked in MLflow)")
    train_.add_argument("--data", help="prepared corpus (bubogpt data prepare): a folder or a URI (s3://bucket/prefix); not used by --stage grounding")
    train_.add_argument("--out", type=Path, required=True, help="output folder (checkpoints, exported model)")
    train_.add_argument("--stage", help="stage1 | stage2 | stage1,stage2 | grounding | all (default all)")
    train_.add_argument("--preset", choices=["tiny", "7b", "13b"], help="default tiny")
    train_.add_argument("--config", type=Path, help="JSON/YAML {stage: {field: value}} overriding the recipe")
    train_.add_argument("--max-steps", type=int, help="steps per stage (short runs)")
    train_.add_argument("--batch-size", type=int, help="per-worker batch size for every stage")
    train_.add_argument("--num-workers", type=int, help=f"default {TrainOptions.num_workers}")
    train_.add_argument("--cpus-per-worker", type=float, help=f"default {TrainOptions.cpus_per_worker}")
    train_.add_argument("--use-gpu", action="store_true")
    train_.add_argument("--deepspeed", choices=["zero2", "zero3"], help="DeepSpeed ZeRO instead of DDP")
    train_.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else OUT/mlflow.db)")
    train_.add_argument("--init", type=Path, help="starting model directory (required for 7b/13b)")
    train_.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    train_.add_argument("--max-failures", type=int, help=f"worker failures survived (default {TrainOptions.max_failures})")
    train_.add_argument("--seed", type=int, help=f"default {TrainOptions.seed}")
    train_.add_argument("--eval", action=argparse.BooleanOptionalAction,
                        help="evaluate the final model on the held-out splits (default on)")
    train_.add_argument("--eval-limit", type=int, help="at most this many eval rows per dataset")
    train_.add_argument("--samples", action=argparse.BooleanOptionalAction,
                        help="log a few generations of each stage's model to MLflow (default on)")
    train_.add_argument("--data-mode", choices=["memory", "stream"],
                        help="memory: each worker reads the training rows once (default for tiny); "
                             "stream: Ray Data shards per epoch (default for 7b/13b)")
    train_.add_argument("--storage", help="where Ray Train keeps the checkpoints: a local path or a URI "
                                          "(s3://bucket/prefix, gs://...; default OUT/ray)")

    eval_ = command(commands, "eval", evaluate, EvalOptions, help="evaluate a model on the held-out splits of a prepared corpus")
    eval_.add_argument("--model", type=Path, required=True, help="model directory (OUT/model of bubogpt train)")
    eval_.add_argument("--data", type=Path, required=True, help="prepared corpus (bubogpt data prepare)")
    eval_.add_argument("--json", type=Path, help="write the metrics, counts and examples here")
    eval_.add_argument("--compare", type=Path, help="a second model directory, evaluated the same way, side by side")
    eval_.add_argument("--limit", type=int, help="at most this many eval rows per dataset")
    eval_.add_argument("--tracking-uri", help="log to this MLflow server (default: $MLFLOW_TRACKING_URI, else none)")
    eval_.add_argument("--ray", action="store_true", help="generate with Ray Data map_batches (large eval splits)")
    eval_.add_argument("--address", help="Ray cluster address (with --ray; default: a local Ray)")

    quick = command(commands, "quickstart", quickstart, QuickstartOptions, help="the whole system end to end on the tiny default")
    quick.add_argument("--workdir", type=Path, help=f"default {QuickstartOptions.workdir}")
    quick.add_argument("--size", choices=["tiny", "small", "medium"],
                       help="synthetic corpus size (tiny: a quick check of the code path; default medium)")
    quick.add_argument("--seed", type=int, help=f"default {QuickstartOptions.seed}")
    quick.add_argument("--max-steps", type=int, help="cap each training stage (quick checks)")
    quick.add_argument("--eval-limit", type=int, help="at most this many eval rows per dataset")
    quick.add_argument("--port", type=int, help=f"Serve HTTP port (loopback; default {QuickstartOptions.port})")
    quick.add_argument("--num-cpus", type=int, help=f"logical CPUs of the local Ray head (default {QuickstartOptions.num_cpus})")
    quick.add_argument("--address", help="use this running Ray cluster instead of starting one")
    quick.add_argument("--stop", action="store_true", help="stop the services a previous run left running")
    return parser


def parse(argv: list[str] | None = None):
    """(the command's function, its options) for a command line."""
    args = build_parser().parse_args(argv)
    return args.func, _options(args.options, args)


def main(argv: list[str] | None = None) -> int:
    function, options = parse(argv)
    name = "bubogpt " + function.__name__.replace("_", " ").replace("evaluate", "eval").strip()
    try:
        return function(options)
    except Exception as err:
        if not isinstance(err, user_errors()):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{name}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
