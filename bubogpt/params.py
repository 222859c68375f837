"""Parameter counts of a preset, built on the meta device (no memory, no weights).

    python -m bubogpt.params 7b
"""

from __future__ import annotations

import argparse
import sys

import torch

from bubogpt.config import PRESETS
from bubogpt.modeling_bubogpt import BuboGPT


def count(model: torch.nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


def parameter_table(preset: str) -> dict[str, int]:
    config = PRESETS[preset]()
    config.llm.path = None  # sizes only: build the LLM from the config, not from a directory
    if not config.llm.vocab_size:
        config.llm.vocab_size = 1024
    with torch.device("meta"):
        model = BuboGPT.build(config)
    table = {
        "audio encoder (ImageBind-H audio)": count(model, "audio_encoder."),
        "vision encoder (EVA ViT-g + ln_vision)": count(model, "vision_encoder."),
        "audio Q-Former (query path)": count(model, "joiner.qformers.audio."),
        "vision Q-Former (query path)": count(model, "joiner.qformers.vision."),
        "audio projection": count(model, "joiner.projections.audio."),
        "vision projection": count(model, "joiner.projections.vision."),
        "LLM": count(model, "llm."),
        "total": count(model),
    }
    table["stage 1 trainable (audio Q-Former + audio projection)"] = sum(
        dict(model.named_parameters())[n].numel() for n in model.set_trainable("stage1")
    )
    table["stage 2 trainable (both projections)"] = sum(
        dict(model.named_parameters())[n].numel() for n in model.set_trainable("stage2")
    )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bubogpt.params")
    parser.add_argument("preset", choices=sorted(PRESETS))
    args = parser.parse_args(argv)
    for name, value in parameter_table(args.preset).items():
        print(f"{name:<55} {value:>16,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
