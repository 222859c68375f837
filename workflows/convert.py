"""`bubogpt convert` and `bubogpt convert-grounding`: the released checkpoints -> the directories that
`bubogpt train --init`, `bubogpt serve --model` and serving's `grounding_dir` take.

    bubogpt convert --imagebind imagebind_huge.pth --eva eva_vit_g.pth \
        --blip2 blip2_pretrained_flant5xxl.pth --bubogpt bubogpt_7b.pth [--minigpt4 prerained_minigpt4_7b.pth] \
        --llm vicuna-7b-v0/ --out models/bubogpt-7b [--dtype bf16|fp16|fp32] [--copy-llm] [--num-heads ...]

    bubogpt convert-grounding --ram ram_swin_large_14m.pth --gdino groundingdino_swint_ogc.pth \
        --sam sam_vit_h_4b8939.pth --bert bert-base-uncased/ --out models/grounding [--dtype ...]

The conversion itself is library code (bubogpt/convert.py); this is the command glue.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from workflows.options import ConvertGroundingOptions, ConvertOptions


def _heads(text: str) -> dict[str, int]:
    """"audio=4,vision=4,qformer=2" -> {"audio": 4, ...}."""
    heads = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in ("audio", "vision", "qformer") or not value.isdigit():
            raise argparse.ArgumentTypeError(f"expected audio=N,vision=N,qformer=N, got {item!r}")
        heads[name] = int(value)
    return heads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`bubogpt convert`'s options."""
    parser.add_argument("--imagebind", type=Path, required=True, help="imagebind_huge.pth")
    parser.add_argument("--eva", type=Path, required=True, help="eva_vit_g.pth")
    parser.add_argument("--blip2", type=Path, required=True, help="blip2_pretrained_flant5xxl.pth (ln_vision; "
                        "the vision Q-Former when the BuboGPT file has none, as the released one)")
    parser.add_argument("--bubogpt", type=Path, required=True, help="bubogpt_7b.pth (or a stage-1 / re-exported joiner)")
    parser.add_argument("--minigpt4", type=Path, help="prerained_minigpt4_7b.pth: the vision projection when the "
                        "BuboGPT file has none (a stage-1 checkpoint)")
    parser.add_argument("--llm", type=Path, required=True, help="the Vicuna v0 directory (Hugging Face format)")
    parser.add_argument("--out", type=Path, required=True, help="the model directory to write (new or empty)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp32",
                        help="storage dtype of the frozen encoders (the joiner stays fp32); default fp32")
    parser.add_argument("--copy-llm", action="store_true", help="copy the LLM into OUT/llm instead of referencing it")
    parser.add_argument("--num-heads", type=_heads, default={},
                        help="attention heads where they differ from width / the released head width, "
                        "e.g. audio=4,vision=4,qformer=2 (no weight shape holds a head count)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")


def run(args: "ConvertOptions") -> int:
    from bubogpt.checkpoints.common import CheckpointMismatchError
    from bubogpt.convert import HeadCounts, ReleasedFiles, convert_released

    try:
        files = ReleasedFiles(imagebind=args.imagebind, eva=args.eva, blip2=args.blip2, bubogpt=args.bubogpt,
                              llm=args.llm, minigpt4=args.minigpt4)  # fmt: skip
        report = convert_released(files, args.out, dtype=args.dtype, copy_llm=args.copy_llm,
                                  heads=HeadCounts(**args.num_heads), overwrite=args.overwrite)  # fmt: skip
    except (CheckpointMismatchError, FileNotFoundError, FileExistsError) as error:
        print(f"bubogpt convert: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def add_grounding_arguments(parser: argparse.ArgumentParser) -> None:
    """`bubogpt convert-grounding`'s options."""
    parser.add_argument("--ram", type=Path, required=True, help="ram_swin_large_14m.pth")
    parser.add_argument("--ram-tags", type=Path, help="ram_tag_list.txt (default: beside --ram)")
    parser.add_argument("--ram-thresholds", type=Path, help="ram_tag_list_threshold.txt (default: beside --ram)")
    parser.add_argument("--ram-config", type=Path, help="a JSON of RAM sizes no shape holds, e.g. {\"bert_heads\": 4} "
                        "(default: the released tagger's)")
    parser.add_argument("--gdino", type=Path, required=True, help="groundingdino_swint_ogc.pth")
    parser.add_argument("--bert", type=Path, required=True,
                        help="a local bert-base-uncased directory (Grounding DINO's tokenizer and text config)")
    parser.add_argument("--sam", type=Path, required=True, help="sam_vit_h_4b8939.pth")
    parser.add_argument("--out", type=Path, required=True, help="the grounding directory to write (new or empty)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp32", help="storage dtype; default fp32")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")


def run_grounding(args: "ConvertGroundingOptions") -> int:
    from bubogpt.checkpoints.common import CheckpointMismatchError
    from bubogpt.convert import GroundingFiles, convert_grounding

    try:
        files = GroundingFiles(ram=args.ram, gdino=args.gdino, sam=args.sam, bert=args.bert,
                               ram_tags=args.ram_tags, ram_thresholds=args.ram_thresholds,
                               ram_config=args.ram_config)  # fmt: skip
        manifest = convert_grounding(files, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except (CheckpointMismatchError, FileNotFoundError, FileExistsError) as error:
        print(f"bubogpt convert-grounding: {error}", file=sys.stderr)
        return 2
    sizes = {key: manifest[key] for key in ("grounding_dino", "sources")}
    print(json.dumps({"out": str(args.out), "ram_tags": manifest["ram"]["num_tags"], **sizes,
                      "ram": manifest["ram_load_report"]}, indent=2))  # fmt: skip
    return 0
