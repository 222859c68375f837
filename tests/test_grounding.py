"""The grounding pipeline with the tiny weights the project ships (bubogpt/assets/grounding_tiny),
scored on held-out synthetic scenes that no training or calibration step saw; geometry on images of
other sizes; the result format and the annotated picture; `bubogpt ground` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bubogpt.grounding import evaluate
from bubogpt.grounding.pipeline import TINY_ASSETS, build_entities, colour_name, load_tiny_grounding
from bubogpt.grounding.result import (
    MASK_ALPHA,
    PALETTE,
    AnswerSpan,
    Entity,
    GroundingResult,
    annotate_image,
    decode_mask,
    drawing_sizes,
    encode_mask,
    entity_colour,
    hex_to_rgb,
)
from bubogpt.grounding.scenes import GroundingScene, SceneObject, draw_scenes
from bubogpt.grounding.training import HELD_OUT_STREAM

# The issues' targets (5 and 18). Per stage, each model given perfect input: tag F1, boxes from the
# true tags, masks from the true boxes. End to end, as a user sees it (`evaluate.score_end_to_end`):
# the pipeline's own tags -> boxes -> masks, every box its entities hold; entity precision and recall
# (label + box at IoU 0.5) and the instance mask IoU in which every extra or missing mask counts 0.
# Measured with the shipped weights on these 60 held-out scenes: tag F1 0.96, boxes from true tags
# P/R 0.91 / 0.95, masks from true boxes 0.90; end to end entity P/R 0.89 / 0.91, instance mask IoU
# 0.74 (benchmarks/results/grounding_60scenes_2026-12-04.json; benchmarks/grounding.py also scores
# 200 scenes of this stream, with COCO AP). A change that degrades the weights or the pipeline below
# a target fails.
TAG_F1_MIN = 0.9
BOX_RECALL_MIN = 0.85
BOX_PRECISION_MIN = 0.8
MASK_IOU_FROM_TRUE_BOXES_MIN = 0.7
ENTITY_PRECISION_MIN = 0.8
ENTITY_RECALL_MIN = 0.8
INSTANCE_MASK_IOU_MIN = 0.6
# Other sizes and aspects: a swapped axis, an offset or a scale taken from the wrong image puts boxes
# and masks elsewhere (scores near 0); scale changes alone cost some quality (SAM's 256-px input
# shrinks the objects of a wide canvas).
GEOMETRY_BOX_MIN = 0.6
GEOMETRY_MASK_IOU_MIN = 0.45

N_HELD_OUT = 60


@pytest.fixture(scope="module")
def pipeline():
    torch.set_num_threads(2)
    return load_tiny_grounding()


@pytest.fixture(scope="module")
def held_out() -> list[GroundingScene]:
    return list(draw_scenes(0, N_HELD_OUT, HELD_OUT_STREAM))


@pytest.fixture(scope="module")
def predicted(pipeline, held_out) -> list[tuple[list, np.ndarray]]:
    """Per scene, the pipeline's detections on its own tags and their masks."""
    return pipeline.detect_and_segment([s.image for s in held_out])


@pytest.fixture(scope="module")
def grounded(predicted, held_out) -> list[list[Entity]]:
    """The entities `ground_images` makes of `predicted` (checked below on a few scenes)."""
    return [build_entities(np.asarray(s.image), d, m) for s, (d, m) in zip(held_out, predicted)]


def test_tags(pipeline, held_out):
    scores = evaluate.tag_scores(pipeline.tagger.tag([s.image for s in held_out]), [s.tags for s in held_out])
    assert scores.f1 >= TAG_F1_MIN, scores


def test_boxes_with_the_right_phrase(pipeline, held_out):
    detections = [pipeline.detector.detect(s.image, s.tags) for s in held_out]
    scores = evaluate.box_scores(detections, held_out)
    assert scores.recall >= BOX_RECALL_MIN and scores.precision >= BOX_PRECISION_MIN, scores


def test_masks_from_true_boxes(pipeline, held_out):
    ious = []
    for scene in held_out:
        masks = pipeline.segmenter.segment(scene.image, [o.box for o in scene.objects])
        assert masks.shape == (len(scene.objects), scene.image.height, scene.image.width)
        ious += [evaluate.mask_iou(m, o.mask) for m, o in zip(masks, scene.objects)]
    assert np.mean(ious) >= MASK_IOU_FROM_TRUE_BOXES_MIN, np.mean(ious)


@pytest.fixture(scope="module")
def end_to_end(predicted, held_out) -> evaluate.EndToEndScores:
    scores = evaluate.score_end_to_end([d for d, _ in predicted], [m for _, m in predicted], held_out)
    print("end to end:", scores.to_dict())
    return scores


def test_entities_end_to_end(end_to_end):
    """Label + box at IoU 0.5, from the tagger's tags: a hallucinated or duplicate box costs precision."""
    entities = end_to_end.entities
    assert entities.precision >= ENTITY_PRECISION_MIN and entities.recall >= ENTITY_RECALL_MIN, entities


def test_masks_end_to_end(end_to_end):
    """Every unpaired predicted or true mask counts 0."""
    assert end_to_end.masks.iou >= INSTANCE_MASK_IOU_MIN, end_to_end.masks


def test_ground_images_shows_the_scored_boxes_and_masks(pipeline, held_out, predicted):
    """What a user gets (`ground_images`) holds exactly the detections and masks scored above."""
    scenes = held_out[:6]
    shown_entities = pipeline.ground_images([s.image for s in scenes])
    for scene, entities, (detections, masks) in zip(scenes, shown_entities, predicted):
        shown = sorted((e.label, tuple(b), m["counts"]) for e in entities for b, m in zip(e.boxes, e.masks))
        scored = sorted((d.label, tuple(round(v, 2) for v in d.box), encode_mask(mask)["counts"])
                        for d, mask in zip(detections, masks))  # fmt: skip
        assert shown == scored, scene.image_id


def two_object_scene() -> GroundingScene:
    """A 40 x 60 scene with a 10 x 10 circle and a 10 x 20 square."""
    circle, square = np.zeros((40, 60), bool), np.zeros((40, 60), bool)
    circle[5:15, 5:15] = True
    square[20:30, 30:50] = True
    return GroundingScene("toy", Image.new("RGB", (60, 40)), [
        SceneObject("circle", "red", (5.0, 5.0, 15.0, 15.0), circle),
        SceneObject("square", "blue", (30.0, 20.0, 50.0, 30.0), square)])  # fmt: skip


def test_end_to_end_scores_charge_extra_and_missing_entities():
    """Hand-computed figures: the scores the targets are asserted on must see a hallucinated entity,
    a duplicate and a missed object."""
    from bubogpt.grounding.detector import Detection

    scene = two_object_scene()
    truth = [Detection(o.kind, o.box, 0.9) for o in scene.objects]
    truth_masks = np.stack([o.mask for o in scene.objects])

    perfect = evaluate.score_end_to_end([truth], [truth_masks], [scene])
    assert (perfect.entities.precision, perfect.entities.recall, perfect.masks.iou) == (1.0, 1.0, 1.0)
    assert all(v == pytest.approx(1.0) for stats in perfect.coco.values() for v in stats.values()), perfect.coco

    # A hallucinated star (nothing of its kind in the scene) and a duplicate circle half off its object.
    star = np.zeros((40, 60), bool)
    star[30:38, 0:8] = True
    duplicate = np.zeros((40, 60), bool)
    duplicate[5:15, 10:20] = True  # IoU with the circle: 50 / 150
    extra = [*truth, Detection("star", (0.0, 30.0, 8.0, 38.0), 0.95),
             Detection("circle", (10.0, 5.0, 20.0, 15.0), 0.5)]  # fmt: skip
    scores = evaluate.score_end_to_end([extra], [np.stack([*truth_masks, star, duplicate])], [scene])
    assert scores.entities.precision == pytest.approx(2 / 4) and scores.entities.recall == 1.0
    assert scores.masks.iou == pytest.approx(2 / 4)  # two pairs of IoU 1 among 4 predicted + 2 true - 2 paired
    # COCO AP does not charge either: the duplicate ranks below its object's match, and a category
    # with no true object is left out of the mean. Hence precision beside it.
    assert scores.coco["box"]["AP50"] == pytest.approx(1.0)

    # The square missed, the circle's mask a quarter too small.
    small = truth_masks[0].copy()
    small[5:15, 5:7] = False  # 80 of the circle's 100 pixels
    missed = evaluate.score_end_to_end([truth[:1]], [small[None]], [scene])
    assert (missed.entities.precision, missed.entities.recall) == (1.0, 0.5)
    assert missed.masks.iou == pytest.approx(0.8 / 2)
    assert missed.coco["box"]["AP50"] == pytest.approx(0.5)  # circle 1.0, square 0.0

    # A wrong label everywhere: nothing is right.
    wrong = [Detection("square" if d.label == "circle" else "circle", d.box, d.score) for d in truth]
    swapped = evaluate.score_end_to_end([wrong], [truth_masks], [scene])
    assert (swapped.entities.true_positives, swapped.masks.iou, swapped.coco["mask"]["AP"]) == (0, 0.0, 0.0)


def test_entities_are_well_formed(grounded, held_out):
    for entities, scene in zip(grounded, held_out):
        assert [e.id for e in entities] == list(range(len(entities)))
        assert [e.colour for e in entities] == [entity_colour(i) for i in range(len(entities))]
        for entity in entities:
            assert len(entity.boxes) == len(entity.masks) >= 1
            for box, rle in zip(entity.boxes, entity.masks):
                x0, y0, x1, y1 = box
                assert 0 <= x0 < x1 <= scene.image.width and 0 <= y0 < y1 <= scene.image.height
                assert rle["size"] == [scene.image.height, scene.image.width] and isinstance(rle["counts"], str)
        json.dumps([e.to_dict() for e in entities])


# --- geometry: other sizes, mirrored, transposed -----------------------------------------------------


def on_canvas(scene: GroundingScene, aspect: float, wide: bool) -> GroundingScene:
    """The scene at its own scale in the far corner of a wider (or taller) canvas of `aspect`, on a
    flat background of its median colour: a non-square image with the objects moved right (or down),
    truth moved along. Shapes keep their size and proportions (stretching would turn circles into
    ellipses, and shrinking them below the detector's operating scale measures something else)."""
    w, h = scene.image.size
    width, height = (max(w, round(aspect * h)), h) if wide else (w, max(h, round(aspect * w)))
    dx, dy = width - w, height - h
    fill = tuple(int(v) for v in np.median(np.asarray(scene.image).reshape(-1, 3), axis=0))
    image = Image.new("RGB", (width, height), fill)
    image.paste(scene.image, (dx, dy))
    objects = []
    for o in scene.objects:
        mask = np.zeros((height, width), bool)
        mask[dy:, dx:] = o.mask
        objects.append(SceneObject(o.kind, o.colour, (o.box[0] + dx, o.box[1] + dy, o.box[2] + dx, o.box[3] + dy), mask))
    return GroundingScene(scene.image_id, image, objects)


def transformed(scene: GroundingScene, size: tuple[int, int] | None = None, mirror: bool = False,
                wide: bool | None = None) -> GroundingScene:
    """The scene mirrored left-right, resized to `size` (w, h), or on a wide / tall canvas
    (aspect 1.6, `on_canvas`), its truth moved along."""
    if wide is not None:
        return on_canvas(scene, 1.6, wide)
    image, objects = scene.image, scene.objects
    if mirror:
        w = image.width
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        objects = [SceneObject(o.kind, o.colour, (w - o.box[2], o.box[1], w - o.box[0], o.box[3]), o.mask[:, ::-1].copy())
                   for o in objects]  # fmt: skip
    if size is not None:
        sx, sy = size[0] / image.width, size[1] / image.height
        image = image.resize(size, Image.BILINEAR)
        objects = [SceneObject(o.kind, o.colour, (o.box[0] * sx, o.box[1] * sy, o.box[2] * sx, o.box[3] * sy),
                               np.asarray(Image.fromarray(o.mask).resize(size, Image.NEAREST)))
                   for o in objects]  # fmt: skip
    return GroundingScene(scene.image_id, image, objects)


@pytest.mark.parametrize(
    "variant",
    [dict(wide=True), dict(wide=False), dict(size=(900, 700)), dict(size=(140, 110)), dict(mirror=True)],
    ids=["wide", "tall", "large", "small", "mirrored"],
)
def test_geometry_on_other_sizes_and_orientations(pipeline, held_out, variant):
    """Boxes and masks follow the image: a swapped axis or a scale taken from the wrong image would
    put them elsewhere on these non-square images and fail."""
    scenes = [transformed(s, **variant) for s in held_out[:20]]
    detections = [pipeline.detector.detect(s.image, s.tags) for s in scenes]
    scores = evaluate.box_scores(detections, scenes)
    assert scores.recall >= GEOMETRY_BOX_MIN and scores.precision >= GEOMETRY_BOX_MIN, scores
    ious = []
    for scene in scenes[:8]:
        masks = pipeline.segmenter.segment(scene.image, [o.box for o in scene.objects])
        assert masks.shape[1:] == (scene.image.height, scene.image.width)
        ious += [evaluate.mask_iou(m, o.mask) for m, o in zip(masks, scene.objects)]
    assert np.mean(ious) >= GEOMETRY_MASK_IOU_MIN, np.mean(ious)


# --- result format and the annotated picture ----------------------------------------------------------


def test_palette_does_not_repeat_before_twenty_entities():
    assert len({entity_colour(i) for i in range(20)}) == 20
    assert len(set(PALETTE)) == len(PALETTE) >= 20


def test_rle_round_trip_and_json():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.5
    rle = encode_mask(mask)
    assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(decode_mask(json.loads(json.dumps(rle))), mask)
    entity = Entity(0, "circle", "#F3C300", [[1.0, 2.0, 3.0, 4.0]], [rle], 0.9, ["red"])
    result = GroundingResult((53, 37), [entity], [AnswerSpan(4, 10, "circle", 0)])
    data = json.loads(json.dumps(result.to_dict()))
    assert Entity.from_dict(data["entities"][0]) == entity and AnswerSpan.from_dict(data["spans"][0]).text == "circle"


def test_build_entities_groups_by_label_and_colour():
    from bubogpt.grounding.detector import Detection

    image = np.full((40, 60, 3), 128, np.uint8)
    masks = np.zeros((3, 40, 60), bool)
    for i, (x, rgb) in enumerate([(0, (220, 40, 40)), (20, (40, 80, 220)), (40, (225, 45, 35))]):
        image[5:15, x:x + 10] = rgb
        masks[i, 5:15, x:x + 10] = True
    detections = [Detection("circle", (0, 5, 10, 15), 0.5), Detection("circle", (20, 5, 30, 15), 0.9),
                  Detection("circle", (40, 5, 50, 15), 0.7)]  # fmt: skip
    entities = build_entities(image, detections, masks)
    # The blue circle scores best; both red circles form one entity, best box first.
    assert [(e.label, e.attributes, e.score, len(e.boxes)) for e in entities] == [
        ("circle", ["blue"], 0.9, 1), ("circle", ["red"], 0.7, 2)]
    assert entities[1].boxes[0] == [40, 5, 50, 15]
    assert colour_name(image, np.zeros((40, 60), bool)) is None


def test_annotated_image_draws_masks_boxes_and_labels_in_the_entity_colour():
    image = Image.new("RGB", (300, 200), (128, 128, 128))
    mask = np.zeros((200, 300), bool)
    mask[60:140, 100:200] = True
    entity = Entity(0, "square", "#0067A5", [[100.0, 60.0, 200.0, 140.0]], [encode_mask(mask)], 0.87, ["grey"])
    out = np.asarray(annotate_image(image, [entity])).astype(int)
    colour = np.array(hex_to_rgb("#0067A5"))
    blended = np.round((1 - MASK_ALPHA) * 128 + MASK_ALPHA * colour)
    np.testing.assert_allclose(out[100, 150], blended, atol=1)  # inside the mask
    np.testing.assert_array_equal(out[190, 20], [128, 128, 128])  # untouched outside
    line, _ = drawing_sizes(300, 200)
    assert (out[100, 100:100 + line] == colour).all()  # the box's left edge
    assert (out[40:60, 100:130] == colour).all(axis=-1).sum() > 50  # the label's background above the box
    assert drawing_sizes(3000, 2000)[0] > drawing_sizes(300, 200)[0]
    assert drawing_sizes(3000, 2000)[1] > drawing_sizes(300, 200)[1]


# --- the command ----------------------------------------------------------------------------------


def test_bubogpt_ground_prints_entities_and_spans_and_writes_the_png(pipeline, held_out, tmp_path, capsys):
    from workflows.cli import main

    # A scene whose first two objects the pipeline grounds (its quality is scored above; here the
    # command's output is checked): the tagger misses a kind in a few held-out scenes.
    scene = next(s for s in held_out if len(s.objects) >= 2
                 and {o.kind for o in s.objects[:2]} <= {e.label for e in pipeline.ground_image(s.image)})
    path = tmp_path / "scene.jpg"
    scene.image.save(path, quality=95)
    first, second = scene.objects[:2]
    plural = second.kind + ("es" if second.kind.endswith("s") else "s")
    answer = f"I see a {first.colour} {first.kind} and two {plural}; no hexagram."
    assert main(["ground", str(path), "--text", answer, "--out", str(tmp_path / "out.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    labels = {e["id"]: e["label"] for e in result["entities"]}
    assert {first.kind, second.kind} <= set(labels.values())
    linked = {(s["text"], labels[s["entity_id"]]) for s in result["spans"]}
    assert linked == {(f"{first.colour} {first.kind}", first.kind), (plural, second.kind)}
    for span in result["spans"]:
        assert answer[span["start"]:span["end"]] == span["text"]
    png = Image.open(tmp_path / "out.png")
    assert png.format == "PNG" and png.size == scene.image.size


def test_bubogpt_ground_rejects_a_bad_image(tmp_path, capsys):
    from workflows.cli import main

    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    assert main(["ground", str(tmp_path / "bad.png"), "--text", "a circle"]) == 2
    assert "bad.png" in capsys.readouterr().err


def test_shipped_assets_are_small_and_documented():
    files = [p for p in TINY_ASSETS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 1024 * 1024
    readme = (TINY_ASSETS / "README.md").read_text()
    assert "bubogpt train --stage grounding" in readme and "--seed" in readme
