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
        return run_local(args.model, port=args.port, host=args.host, api_key_env=args.api_key_env)
    except SettingsError as err:
        print(f"bubogpt serve: {err}", file=sys.stderr)
        return 2


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
    prepare.add_argument("--out", type=Path, required=True, help="output folder (must be new or empty)")
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
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
