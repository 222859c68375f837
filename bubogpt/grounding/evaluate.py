"""Scores of the grounding stages against synthetic ground truth.

- tags: micro precision / recall / F1 over (image, tag) pairs;
- boxes: a detection is a true positive when it overlaps an unclaimed true object of the SAME label
  with IoU >= 0.5 (detections taken best score first, each true object claimed once);
- masks: IoU of each predicted mask with its object's true mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bubogpt.grounding.detector import Detection
from bubogpt.grounding.scenes import GroundingScene


@dataclass
class PRF:
    true_positives: int
    predicted: int
    actual: int

    @property
    def precision(self) -> float:
        return self.true_positives / self.predicted if self.predicted else 1.0

    @property
    def recall(self) -> float:
        return self.true_positives / self.actual if self.actual else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def tag_scores(predicted: list[list[str]], actual: list[list[str]]) -> PRF:
    tp = sum(len(set(p) & set(a)) for p, a in zip(predicted, actual, strict=True))
    return PRF(tp, sum(len(set(p)) for p in predicted), sum(len(set(a)) for a in actual))


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """IoU of two pixel xyxy boxes."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def match_detections(detections: list[Detection], scene: GroundingScene, iou_threshold: float = 0.5) -> list[int | None]:
    """For each detection (in the given order), the index of the true object it claims, or None."""
    claimed: set[int] = set()
    order = sorted(range(len(detections)), key=lambda i: -detections[i].score)
    result: list[int | None] = [None] * len(detections)
    for i in order:
        det = detections[i]
        best, best_iou = None, iou_threshold
        for j, obj in enumerate(scene.objects):
            if j in claimed or obj.kind != det.label:
                continue
            iou = box_iou(det.box, obj.box)
            if iou >= best_iou:
                best, best_iou = j, iou
        if best is not None:
            claimed.add(best)
            result[i] = best
    return result


def box_scores(detections: list[list[Detection]], scenes: list[GroundingScene], iou_threshold: float = 0.5) -> PRF:
    tp = sum(sum(m is not None for m in match_detections(d, s, iou_threshold))
             for d, s in zip(detections, scenes, strict=True))  # fmt: skip
    return PRF(tp, sum(len(d) for d in detections), sum(len(s.objects) for s in scenes))


def mask_iou(predicted: np.ndarray, actual: np.ndarray) -> float:
    """IoU of two (H, W) bool masks (1.0 when both are empty)."""
    union = np.logical_or(predicted, actual).sum()
    return float(np.logical_and(predicted, actual).sum() / union) if union else 1.0
