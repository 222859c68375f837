"""Scores of the grounding stages against synthetic ground truth.

Per stage (what each model does given perfect input):
- tags: micro precision / recall / F1 over (image, tag) pairs;
- boxes: a detection is a true positive when it overlaps an unclaimed true object of the SAME label
  with IoU >= 0.5 (detections taken best score first, each true object claimed once);
- masks: IoU of each predicted mask with its object's true mask.

End to end, as a user sees it (`score_end_to_end`): the pipeline's own tags, its detections on them
and a mask per detection, i.e. every box and mask the entities hold:
- entity precision / recall: `box_scores` on those detections, so a hallucinated or duplicate box
  costs precision and a missed object costs recall;
- instance mask IoU (`instance_mask_iou`): predicted and true masks of the same label paired one to
  one (the pairing with the largest total IoU); the sum of the paired IoUs over the number of
  predicted and true masks counting each pair once. Every unpaired prediction and every unpaired
  true object adds a 0. "The best mask per true object" would let extra masks cost nothing, and the
  union of a label's masks would let a duplicate that lies on its object cost nothing;
- COCO-style box and mask AP (`coco_average_precision`), computed by pycocotools' COCOeval on the
  same predictions with their detection scores, so the figures compare with published ones.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.optimize import linear_sum_assignment

from bubogpt.grounding.detector import Detection
from bubogpt.grounding.result import encode_mask
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


# ---------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------


@dataclass
class MaskScore:
    iou_sum: float  # over the paired (prediction, true object) masks
    predicted: int
    actual: int
    paired: int

    @property
    def iou(self) -> float:
        """Mean IoU over the union of predictions and true objects (each pair counted once)."""
        count = self.predicted + self.actual - self.paired
        return self.iou_sum / count if count else 1.0


def mask_iou_matrix(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """(P, H, W) and (T, H, W) bool masks -> (P, T) IoU."""
    if not len(predicted) or not len(actual):
        return np.zeros((len(predicted), len(actual)))
    encode = lambda masks: [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]  # noqa: E731
    ious = mask_utils.iou(encode(predicted), encode(actual), [0] * len(actual))  # no crowd regions
    return np.asarray(ious).reshape(len(predicted), len(actual))


def instance_mask_iou(detections: list[list[Detection]], masks: list[np.ndarray],
                      scenes: list[GroundingScene]) -> MaskScore:
    """Predicted masks (one (N, H, W) array per image, one mask per detection) against the true ones,
    paired one to one within each label by the largest total IoU; pairs with IoU 0 are not pairs."""
    total = MaskScore(0.0, 0, 0, 0)
    for dets, image_masks, scene in zip(detections, masks, scenes, strict=True):
        total.predicted += len(dets)
        total.actual += len(scene.objects)
        for label in {d.label for d in dets} & {o.kind for o in scene.objects}:
            mine = [i for i, d in enumerate(dets) if d.label == label]
            truth = [o.mask for o in scene.objects if o.kind == label]
            ious = mask_iou_matrix(np.asarray(image_masks)[mine], np.stack(truth))
            rows, cols = linear_sum_assignment(ious, maximize=True)
            paired = ious[rows, cols]
            total.iou_sum += float(paired.sum())
            total.paired += int((paired > 0).sum())
    return total


def _coco_ground_truth(scenes: list[GroundingScene], labels: list[str]) -> COCO:
    annotations = []
    for image_id, scene in enumerate(scenes):
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": labels.index(obj.kind) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(obj.mask.sum()),
                "segmentation": encode_mask(obj.mask), "iscrowd": 0,
            })  # fmt: skip
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": s.image.width, "height": s.image.height} for i, s in enumerate(scenes)],
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": label} for i, label in enumerate(labels)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


COCO_STATS = ("AP", "AP50", "AP75")  # COCOeval.stats[0:3]: IoU 0.50:0.95, 0.50, 0.75; all areas, 100 dets


def coco_average_precision(detections: list[list[Detection]], masks: list[np.ndarray],
                           scenes: list[GroundingScene]) -> dict[str, dict[str, float]]:
    """{"box": {"AP", "AP50", "AP75"}, "mask": {...}} by pycocotools' COCOeval (0.0 with no detections)."""
    labels = sorted({o.kind for s in scenes for o in s.objects} | {d.label for dets in detections for d in dets})
    ground_truth = _coco_ground_truth(scenes, labels)
    results = [
        {"image_id": image_id, "category_id": labels.index(d.label) + 1, "score": d.score,
         "bbox": [d.box[0], d.box[1], d.box[2] - d.box[0], d.box[3] - d.box[1]],
         "segmentation": encode_mask(mask)}
        for image_id, (dets, image_masks) in enumerate(zip(detections, masks, strict=True))
        for d, mask in zip(dets, image_masks, strict=True)
    ]  # fmt: skip
    scores = {}
    for kind, iou_type in (("box", "bbox"), ("mask", "segm")):
        if not results:
            scores[kind] = dict.fromkeys(COCO_STATS, 0.0)
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            # loadRes derives a box result's area from its bbox and a mask result's from its mask.
            keep = (lambda key: True) if iou_type == "segm" else (lambda key: key != "segmentation")
            predicted = ground_truth.loadRes([{k: v for k, v in r.items() if keep(k)} for r in results])
            evaluation = COCOeval(ground_truth, predicted, iou_type)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        scores[kind] = {name: float(max(value, 0.0)) for name, value in zip(COCO_STATS, evaluation.stats[:3])}
    return scores


@dataclass
class EndToEndScores:
    entities: PRF  # label + box at IoU 0.5, every box the entities hold
    masks: MaskScore
    coco: dict[str, dict[str, float]]  # COCOeval box and mask AP, AP50, AP75

    def to_dict(self) -> dict:
        return {
            "entity_precision": self.entities.precision, "entity_recall": self.entities.recall,
            "entity_f1": self.entities.f1, "entities_predicted": self.entities.predicted,
            "entities_true_positive": self.entities.true_positives, "objects": self.entities.actual,
            "instance_mask_iou": self.masks.iou, "mask_pairs": self.masks.paired,
            **{f"{kind}_{name}": value for kind, stats in self.coco.items() for name, value in stats.items()},
        }  # fmt: skip


def score_end_to_end(detections: list[list[Detection]], masks: list[np.ndarray],
                     scenes: list[GroundingScene]) -> EndToEndScores:
    """Detections and masks per image as the pipeline made them from its own tags
    (`GroundingPipeline.detect_and_segment`)."""
    return EndToEndScores(box_scores(detections, scenes), instance_mask_iou(detections, masks, scenes),
                          coco_average_precision(detections, masks, scenes))
