"""The pretrained tiny components, assembled, on more held-out pictures than their phases score (issue 16).

    python benchmarks/pretrained_tiny.py [--git-rev REV] [--pictures 400] [--label L]

Encoder -> vision Q-Former -> projection -> tiny LLM, loaded through the original-format loaders
(`load_pretrained_tiny`), asked one question of each type about each of N pictures of the held-out
stream `align_held_out` (seed 0; the phases score its first 100) and, for each picture, the pairs
of `score_pairs` (a sound told in words: locate its source, or call the pair unrelated). With
`--git-rev REV` the shipped `tiny_vision` and `tiny_llm` of that commit are scored beside the working
tree's (a baseline in the same run). Writes benchmarks/results/pretrained_tiny_<date><L>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bubogpt.pretraining import assets  # noqa: E402
from bubogpt.pretraining import tiny_components as tc  # noqa: E402

COLUMNS = (("colour", "image_qa_colour"), ("kind", "image_qa_kind"), ("position", "image_qa_position"),
           ("count", "image_qa_count"), ("source located", "pair_localisation"), ("unrelated", "pair_unrelated_rate"),
           ("false alarms", "pair_false_alarm_rate"), ("sound talk", "modality_hallucination_rate"))  # fmt: skip


def assets_at(rev: str, into: Path) -> tuple[Path, Path]:
    """The tiny_vision and tiny_llm folders of commit `rev`, extracted under `into`."""
    archive = subprocess.run(["git", "archive", rev, "bubogpt/assets/tiny_vision", "bubogpt/assets/tiny_llm"],
                             cwd=REPO, check=True, capture_output=True).stdout  # fmt: skip
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "bubogpt/assets/tiny_vision", into / "bubogpt/assets/tiny_llm"


def score(vision_dir: Path, llm_dir: Path, pictures: int) -> dict[str, float]:
    model = assets.load_pretrained_tiny(vision_dir=vision_dir, llm_dir=llm_dir, seed=0)
    held = tc.PicturePool(0, "align_held_out", pictures, tc.VISION_ENCODER.img_size, tc.VISION_GRID)
    tokens = tc.encode_pool(model.vision_encoder, held)
    qa = tc.score_image_qa(model, tokens, held.scenes, 0).metrics()
    pairs = tc.score_pairs(model, tokens, held.scenes, 0).metrics()
    return {**qa, **{f"pair_{k}": v for k, v in pairs.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--git-rev", help="also score this commit's shipped assets (the baseline)")
    parser.add_argument("--pictures", type=int, default=400)
    parser.add_argument("--label", default="")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = " ".join(["python", "benchmarks/pretrained_tiny.py", *sys.argv[1:]])
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    rows: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {f"working tree (HEAD {head})": (assets.VISION_DIR, assets.LLM_DIR)}
        if args.git_rev:  # the baseline first, as its row is printed first
            folders = {f"assets of {args.git_rev}": assets_at(args.git_rev, Path(tmp)), **folders}
        for name, (vision_dir, llm_dir) in folders.items():
            started = time.time()
            rows[name] = score(vision_dir, llm_dir, args.pictures)
            seconds[name] = round(time.time() - started, 1)
    record = {"date": datetime.date.today().isoformat(), "command": command, "pictures": args.pictures,
              "stream": "align_held_out", "seed": 0, "seconds": seconds, "rows": rows}  # fmt: skip
    out = REPO / "benchmarks/results" / f"pretrained_tiny_{record['date']}{args.label}.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"# {command}  ({args.pictures} held-out pictures; -> {out.relative_to(REPO)})")
    print("| assets | " + " | ".join(name for name, _ in COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for name, metrics in rows.items():
        print(f"| {name} | " + " | ".join(f"{metrics[key]:.3f}" for _, key in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
