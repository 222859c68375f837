"""The `bubogpt` command. Each subcommand imports its workflow only when it runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _data_synth(args: argparse.Namespace) -> int:
    import json

    from bubogpt.data.synth import synthesize

    corpus = synthesize(args.out, seed=args.seed, size=args.size)
    print(json.dumps(corpus, indent=2))
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    import json
    import logging

    from workflows.prepare import PrepareError, run_prepare

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        manifest = run_prepare(
            args.input,
            args.out,
            preset=args.preset,
            address=args.address,
            features_model=args.features_model,
            overwrite=args.overwrite,
            workers=args.workers,
            num_gpus=args.num_gpus,
        )
    except PrepareError as err:
        print(f"bubogpt data prepare: {err}", file=sys.stderr)
        return 2
    summary = {key: manifest[key] for key in ("preset", "shapes", "features", "counts")}
    print(json.dumps({**summary, "skipped": len(manifest["skipped"]), "out": str(args.out)}, indent=2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from serve.local import run_local
    from serve.settings import SettingsError

    try:
        return run_local(args.model, port=args.port, host=args.host, api_key_env=args.api_key_env,
                         metrics_port=args.metrics_port)
    except SettingsError as err:
        print(f"bubogpt serve: {err}", file=sys.stderr)
        return 2


def _ground(args: argparse.Namespace) -> int:
    import json

    from bubogpt.grounding.pipeline import load_grounding
    from bubogpt.grounding.result import annotate_image
    from bubogpt.preprocess import MediaError, decode_image

    try:
        image = decode_image(args.image)
    except (MediaError, FileNotFoundError) as err:
        print(f"bubogpt ground: {err}", file=sys.stderr)
        return 2
    matcher = None
    if args.llm is not None:
        from bubogpt.checkpoints.native import load_model
        from bubogpt.grounding.matcher import LLMMatcher

        matcher = LLMMatcher(load_model(args.llm))
    pipeline = load_grounding(args.grounding, matcher)
    result = pipeline.ground(image, args.text)
    out = args.out or Path(f"{Path(args.image).stem}_grounded.png")
    annotate_image(image, result.entities).save(out, format="PNG")
    print(json.dumps({**result.to_dict(), "annotated_png": str(out)}, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.stage == "grounding":  # draws its own scenes: no --data
        from workflows.train_grounding import run_grounding_training

        return run_grounding_training(args)
    if args.data is None:
        print("bubogpt train: --data is required (a prepared corpus) for every stage but grounding", file=sys.stderr)
        return 2
    from bubogpt.training import TrainConfigError
    from workflows.train import TrainJobError, run_training

    try:
        return run_training(args)
    except (TrainJobError, TrainConfigError) as err:
        print(f"bubogpt train: {err}", file=sys.stderr)
        return 2


def _eval(args: argparse.Namespace) -> int:
    from workflows.evaluate import run_eval

    return run_eval(args)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, help="prepared corpus (bubogpt data prepare); not used by --stage grounding")
    parser.add_argument("--out", type=Path, required=True, help="output folder (checkpoints, exported model)")
    parser.add_argument("--stage", default="all", help="lm_warmup | vision_align | stage1 | stage2 | grounding | all")
    parser.add_argument("--preset", choices=["tiny", "7b", "13b"], default="tiny")
    parser.add_argument("--config", type=Path, help="JSON/YAML {stage: {field: value}} overriding the recipe")
    parser.add_argument("--max-steps", type=int, help="steps per stage (short runs)")
    parser.add_argument("--batch-size", type=int, help="per-worker batch size for every stage")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--deepspeed", choices=["zero2", "zero3"], help="DeepSpeed ZeRO instead of DDP")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else OUT/mlflow.db)")
    parser.add_argument("--init", type=Path, help="starting model directory (required for 7b/13b)")
    parser.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    parser.add_argument("--max-failures", type=int, default=2, help="worker failures survived per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                        help="evaluate the final model on the held-out splits")
    parser.add_argument("--eval-limit", type=int, help="at most this many eval rows per dataset")
    parser.add_argument("--samples", action=argparse.BooleanOptionalAction, default=True,
                        help="log a few generations of each stage's model to MLflow")
    parser.add_argument("--data-mode", choices=["memory", "stream"], default="memory",
                        help="memory: each worker reads the training rows once; stream: Ray Data shards per epoch")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model directory (OUT/model of bubogpt train)")
    parser.add_argument("--data", type=Path, required=True, help="prepared corpus (bubogpt data prepare)")
    parser.add_argument("--json", type=Path, help="write the metrics, counts and examples here")
    parser.add_argument("--compare", type=Path, help="a second model directory, evaluated the same way, side by side")
    parser.add_argument("--limit", type=int, help="at most this many eval rows per dataset")
    parser.add_argument("--tracking-uri", help="log to this MLflow server (default: $MLFLOW_TRACKING_URI, else none)")
    parser.add_argument("--ray", action="store_true", help="generate with Ray Data map_batches (large eval splits)")
    parser.add_argument("--address", help="Ray cluster address (with --ray; default: a local Ray)")


def _quickstart(args: argparse.Namespace) -> int:
    from workflows.quickstart import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bubogpt", description="BuboGPT on Ray: data, training, evaluation, serving.")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="build and prepare corpora").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the synthetic multimodal corpus in the original formats")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", choices=["tiny", "small", "medium"], default="small")
    synth.set_defaults(func=_data_synth)

    prepare = data.add_parser(
        "prepare", help="preprocess a corpus (INPUT/corpus.json layout) into Parquet shards with Ray Data"
    )
    prepare.add_argument("--input", type=Path, required=True, help="folder holding corpus.json")
    prepare.add_argument("--out", required=True, help="output folder or URI (s3://bucket/prefix, gs://...); new or empty")
    prepare.add_argument("--address", default=None, help="an existing Ray cluster (default: a local Ray)")
    prepare.add_argument("--preset", choices=["tiny", "7b", "13b"], default="tiny", help="image size and clips")
    prepare.add_argument("--features-model", type=Path, default=None, help="also store frozen encoder tokens")
    prepare.add_argument("--overwrite", action="store_true", help="replace a previous prepared output")
    prepare.add_argument("--workers", type=int, default=None, help="preprocessing actors (default: cluster CPUs)")
    prepare.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (features on GPU)")
    prepare.set_defaults(func=_data_prepare)

    serve = commands.add_parser("serve", help="run the Ray Serve application (serve/config.yaml) for a model directory")
    serve.add_argument("--model", type=Path, required=True, help="a model directory (save_model / training output)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback only)")
    serve.add_argument("--api-key-env", default=None, help="environment variable holding the bearer token to require")
    serve.add_argument("--metrics-port", type=int, default=None,
                       help="Ray's metrics export port: Prometheus metrics at http://HOST:PORT/metrics")
    serve.set_defaults(func=_serve)
    ground = commands.add_parser("ground", help="ground an answer in an image: entities, spans (JSON) and an annotated PNG")
    ground.add_argument("image", type=Path, help="the image file")
    ground.add_argument("--text", required=True, help="the answer whose mentions are linked to the image's entities")
    ground.add_argument("--out", type=Path, default=None, help="annotated PNG (default: ./<image stem>_grounded.png)")
    ground.add_argument("--grounding", type=Path, default=None,
                        help="tiny-layout weights or the released checkpoints (default: the shipped tiny models)")
    ground.add_argument("--llm", type=Path, default=None,
                        help="a model directory whose LLM links the spans (default: the deterministic matcher)")
    ground.set_defaults(func=_ground)

    train = commands.add_parser("train", help="train BuboGPT's stages on Ray Train (tracked in MLflow)")
    add_train_arguments(train)
    train.set_defaults(func=_train)
    evaluate = commands.add_parser("eval", help="evaluate a model on the held-out splits of a prepared corpus")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=_eval)

    from workflows import convert

    converter = commands.add_parser("convert", help="the released BuboGPT checkpoints -> a model directory")
    convert.add_arguments(converter)
    converter.set_defaults(func=convert.run)
    grounding_converter = commands.add_parser("convert-grounding", help="RAM, Grounding DINO, SAM -> a grounding directory")
    convert.add_grounding_arguments(grounding_converter)
    grounding_converter.set_defaults(func=convert.run_grounding)

    quickstart = commands.add_parser("quickstart", help="the whole system end to end on the tiny default")
    from workflows.quickstart import add_arguments as add_quickstart_arguments

    add_quickstart_arguments(quickstart)
    quickstart.set_defaults(func=_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
