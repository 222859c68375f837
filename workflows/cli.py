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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bubogpt", description="BuboGPT on Ray: data, training, evaluation, serving.")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="build and prepare corpora").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the synthetic multimodal corpus in the original formats")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", choices=["small", "medium"], default="small")
    synth.set_defaults(func=_data_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
