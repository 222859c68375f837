"""Grounding quality end to end, as a user sees it, on a fixed held-out set of synthetic scenes.

The pipeline (by default the shipped tiny weights, `bubogpt/assets/grounding_tiny`) tags each scene
itself, detects boxes for its own tags and segments one mask per box: every box and mask the
entities it returns hold. Scored by `bubogpt.grounding.evaluate`:

- entity precision / recall: label + box at IoU 0.5, each true object claimed once (a hallucinated
  or duplicate box costs precision, a missed object recall);
- instance mask IoU: predicted and true masks of a label paired one to one by the largest total
  IoU; paired IoUs summed over (predicted + true - paired): each extra or missing mask adds a 0;
- COCO box and mask AP (IoU 0.50:0.95), AP50, AP75 by pycocotools' COCOeval, with the detection
  scores, so the figures compare with published ones;
- where the misses come from: false positives whose label is absent from the scene (a tagger
  hallucination), that duplicate an object already found, that lie on an object of another kind
  (a kind confusion: which kind got which label is counted), or that are elsewhere; missed objects
  whose kind the tagger missed, or that the detector missed on a right tag;
- per stage, each model given perfect input (tag P/R/F1; boxes from the true tags; masks from the
  true boxes), to locate a loss.

    python benchmarks/grounding.py                       # 200 scenes of the tests' held-out stream
    python benchmarks/grounding.py --scenes 60           # the 60 that tests/test_grounding.py scores
    python benchmarks/grounding.py --weights DIR         # other weights in the tiny layout

Writes benchmarks/results/grounding_<date>.json (or --out). 30 s (idle) to 4 minutes (loaded) for 200 scenes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bubogpt.grounding import evaluate  # noqa: E402
from bubogpt.grounding.detector import Detection  # noqa: E402
from bubogpt.grounding.pipeline import TINY_ASSETS, GroundingPipeline, load_grounding  # noqa: E402
from bubogpt.grounding.scenes import GroundingScene, draw_scenes  # noqa: E402
from bubogpt.grounding.training import HELD_OUT_STREAM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def where_misses_come_from(tags: list[list[str]], detections: list[list[Detection]],
                           scenes: list[GroundingScene]) -> dict:
    """False positives and missed objects, each put in one cause; and which kind got which label."""
    causes = dict.fromkeys(["fp_label_not_in_scene", "fp_duplicate", "fp_other_kinds_object", "fp_misplaced",
                            "fn_tag_missed", "fn_box_missed_on_right_tag"], 0)  # fmt: skip
    confusions: Counter = Counter()  # "true kind -> label" of the boxes that lie on another kind's object
    for image_tags, dets, scene in zip(tags, detections, scenes, strict=True):
        claimed = evaluate.match_detections(dets, scene)
        for det, match in zip(dets, claimed):
            if match is not None:
                continue
            same_label = [o for o in scene.objects if o.kind == det.label]
            under = [o for o in scene.objects if o.kind != det.label and evaluate.box_iou(det.box, o.box) >= 0.5]
            if not same_label:
                causes["fp_label_not_in_scene"] += 1  # the tagger's hallucination, boxed
            elif max(evaluate.box_iou(det.box, o.box) for o in same_label) >= 0.5:
                causes["fp_duplicate"] += 1  # its object was claimed by a better-scored box
            elif under:
                causes["fp_other_kinds_object"] += 1  # the label exists in the scene, the box is on another kind
                confusions[f"{under[0].kind} -> {det.label}"] += 1
            else:
                causes["fp_misplaced"] += 1
        found = {m for m in claimed if m is not None}
        for index, obj in enumerate(scene.objects):
            if index not in found:
                causes["fn_tag_missed" if obj.kind not in image_tags else "fn_box_missed_on_right_tag"] += 1
    return {**causes, "confusions": dict(confusions.most_common())}


def best_mask_per_object(detections: list[list[Detection]], masks: list[np.ndarray],
                         scenes: list[GroundingScene]) -> float:
    """The former, lenient measure (for comparison only): per true object, the best IoU among the
    masks of its label, extra masks free."""
    ious = [max((evaluate.mask_iou(m, obj.mask) for d, m in zip(dets, image_masks) if d.label == obj.kind), default=0.0)
            for dets, image_masks, scene in zip(detections, masks, scenes) for obj in scene.objects]  # fmt: skip
    return float(np.mean(ious))


def per_stage(pipeline: GroundingPipeline, scenes: list[GroundingScene], tags: list[list[str]]) -> dict[str, float]:
    tag_scores = evaluate.tag_scores(tags, [s.tags for s in scenes])
    boxes = evaluate.box_scores([pipeline.detector.detect(s.image, s.tags) for s in scenes], scenes)
    ious = []
    for scene in scenes:
        masks = pipeline.segmenter.segment(scene.image, [o.box for o in scene.objects])
        ious += [evaluate.mask_iou(m, o.mask) for m, o in zip(masks, scene.objects)]
    return {"tag_precision": tag_scores.precision, "tag_recall": tag_scores.recall, "tag_f1": tag_scores.f1,
            "box_precision_true_tags": boxes.precision, "box_recall_true_tags": boxes.recall,
            "mask_iou_true_boxes": float(np.mean(ious))}  # fmt: skip


def table(end_to_end: dict, stages: dict, misses: dict) -> str:
    rows = [
        ("end to end", "entity precision (label + box, IoU 0.5)", f"{end_to_end['entity_precision']:.3f}"),
        ("end to end", "entity recall", f"{end_to_end['entity_recall']:.3f}"),
        ("end to end", "instance mask IoU (extra and missing masks count 0)", f"{end_to_end['instance_mask_iou']:.3f}"),
        ("end to end", "COCO box AP / AP50 / AP75",
         f"{end_to_end['box_AP']:.3f} / {end_to_end['box_AP50']:.3f} / {end_to_end['box_AP75']:.3f}"),
        ("end to end", "COCO mask AP / AP50 / AP75",
         f"{end_to_end['mask_AP']:.3f} / {end_to_end['mask_AP50']:.3f} / {end_to_end['mask_AP75']:.3f}"),
        ("end to end", "former lenient mask IoU (best mask per object, extras free)",
         f"{end_to_end['former_best_mask_per_object_iou']:.3f}"),
        ("end to end", "boxes shown / right / true objects",
         f"{end_to_end['entities_predicted']} / {end_to_end['entities_true_positive']} / {end_to_end['objects']}"),
        *[("misses", name, str(count)) for name, count in misses.items() if name != "confusions"],
        ("misses", "boxes on another kind's object (true kind -> label)",
         ", ".join(f"{pair}: {n}" for pair, n in misses["confusions"].items()) or "none"),
        ("per stage", "tag precision / recall / F1",
         f"{stages['tag_precision']:.3f} / {stages['tag_recall']:.3f} / {stages['tag_f1']:.3f}"),
        ("per stage", "box precision / recall from the true tags",
         f"{stages['box_precision_true_tags']:.3f} / {stages['box_recall_true_tags']:.3f}"),
        ("per stage", "mask IoU from the true boxes", f"{stages['mask_iou_true_boxes']:.3f}"),
    ]  # fmt: skip
    lines = ["| part | measure | value |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=200, help="held-out scenes 0 .. N-1")
    parser.add_argument("--seed", type=int, default=0, help="the held-out stream's seed (the tests use 0)")
    parser.add_argument("--weights", type=Path, default=None, help=f"grounding weights (default {TINY_ASSETS})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default benchmarks/results/grounding_<date>.json)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    command = "python benchmarks/grounding.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    pipeline = load_grounding(args.weights)
    scenes = list(draw_scenes(args.seed, args.scenes, HELD_OUT_STREAM))
    tags = pipeline.tagger.tag([s.image for s in scenes])
    predicted = pipeline.detect_and_segment([s.image for s in scenes])  # tags again, inside: what a user runs
    detections, masks = [d for d, _ in predicted], [m for _, m in predicted]
    end_to_end = evaluate.score_end_to_end(detections, masks, scenes).to_dict()
    end_to_end["former_best_mask_per_object_iou"] = best_mask_per_object(detections, masks, scenes)
    misses = where_misses_come_from(tags, detections, scenes)
    stages = per_stage(pipeline, scenes, tags)
    seconds = time.perf_counter() - started

    print(table(end_to_end, stages, misses))
    print(f"\n{args.scenes} scenes of stream {HELD_OUT_STREAM!r}, seed {args.seed}; {seconds:.0f} s")
    print(f"$ {command.strip()}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    out = args.out or REPO / "benchmarks" / "results" / f"grounding_{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": command.strip(), "date": datetime.date.today().isoformat(), "commit": commit,
        "weights": str(args.weights or TINY_ASSETS.relative_to(REPO)),
        "scenes": {"stream": HELD_OUT_STREAM, "seed": args.seed, "count": args.scenes},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                    "processor": platform.processor() or platform.machine()},
        "seconds": round(seconds, 1),
        "end_to_end": end_to_end, "misses": misses, "per_stage": stages,
        "definitions": {
            "entity_precision_recall": "every box the entities hold, from the pipeline's own tags; true positive: same "
                                       "label and box IoU >= 0.5 with an unclaimed true object, best score first",
            "instance_mask_iou": "predicted and true masks of each label paired one to one by the largest total IoU "
                                 "(Hungarian); sum of paired IoUs / (predicted + true - paired)",
            "coco": "pycocotools COCOeval stats[0:3] (AP at IoU .50:.95, AP50, AP75; all areas, 100 detections)",
        },
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
