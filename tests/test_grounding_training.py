"""Training the tiny grounding models: the detector's set loss on mixed batches, the schedule and time
budget, and `bubogpt train --stage grounding` under Ray Train on a micro recipe."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from bubogpt.grounding.detector import build_tiny_grounding_dino
from bubogpt.grounding.scenes import TAGS, GroundingScene, draw_scenes
from bubogpt.grounding.training import (
    DetectorBatch,
    LoopConfig,
    _Budget,
    detector_batch,
    detector_loss,
    flip,
    lr_factor,
)


def _square(scene: GroundingScene, side: int = 160) -> GroundingScene:
    """The scene resized to side x side (boxes scaled), so a batch of them needs no padding."""
    sx, sy = side / scene.image.width, side / scene.image.height
    objects = [type(o)(o.kind, o.colour, (o.box[0] * sx, o.box[1] * sy, o.box[2] * sx, o.box[3] * sy), o.mask)
               for o in scene.objects]  # fmt: skip
    return GroundingScene(scene.image_id, scene.image.resize((side, side)), objects)


def test_detector_loss_of_a_mixed_batch_is_the_sum_of_its_images(tmp_path):
    """Captions with different numbers of phrases in one batch: each image's token targets must come
    from its own caption. The batched loss (a sum over boxes / all boxes) then equals the per-image
    losses weighted by their box counts. transformers' own criterion fails this (IndexError or wrong
    targets), which is why `decoder_set_loss` uses a fixed one."""
    torch.manual_seed(0)
    model = build_tiny_grounding_dino(tmp_path, list(TAGS)).eval()
    scenes = [_square(s) for s in draw_scenes(3, 3, "loss_test")]
    batch = detector_batch(scenes, np.random.default_rng(0), (128,), 224)
    assert len({c.count(".") for c in batch.captions}) > 1  # the captions differ in phrase count
    with torch.no_grad():
        _, together = detector_loss(model, batch)
        singles = [detector_loss(model, DetectorBatch(batch.pixel_values[i : i + 1], batch.pixel_mask[i : i + 1],
                                                      batch.captions[i : i + 1], batch.labels[i : i + 1]))[1]
                   for i in range(3)]  # fmt: skip
    counts = [len(label["boxes"]) for label in batch.labels]
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_ce_enc", "loss_bbox_enc"):
        weighted = sum(single[key] * n for single, n in zip(singles, counts)) / sum(counts)
        torch.testing.assert_close(together[key], weighted, rtol=2e-4, atol=2e-4)


def test_encoder_proposal_loss_trains_the_encoder_heads(tmp_path):
    """transformers hands its loss detached encoder proposals; ours must reach the encoder's heads."""
    torch.manual_seed(0)
    model = build_tiny_grounding_dino(tmp_path, list(TAGS)).train()
    batch = detector_batch(list(draw_scenes(4, 2, "loss_test")), np.random.default_rng(0), (96,), 160)
    loss, terms = detector_loss(model, batch)
    terms["loss_bbox_enc"].backward(retain_graph=True)
    heads = model.model.model
    assert heads.encoder_output_bbox_embed.layers[-1].weight.grad.abs().sum() > 0  # (earlier layers: 0 at init)
    model.zero_grad()
    terms["loss_ce_enc"].backward()
    assert heads.enc_output.weight.grad.abs().sum() > 0


def test_detector_batch_geometry_and_captions():
    scene = next(draw_scenes(5, 1, "batch_test"))
    batch = detector_batch([scene, flip(scene)], np.random.default_rng(1), (128,), 224)
    assert batch.pixel_values.shape[-2] % 32 == 0 and batch.pixel_values.shape[-1] % 32 == 0
    h, w = batch.pixel_mask[0].nonzero().max(0).values + 1
    assert abs(w / h - scene.image.width / scene.image.height) < 0.02  # aspect ratio kept
    for caption, label, source in zip(batch.captions, batch.labels, [scene, flip(scene)]):
        phrases = [p.strip() for p in caption.rstrip(" .").split(" . ")]
        for obj, cls, box in zip(source.objects, label["class_labels"], label["boxes"]):
            assert phrases[int(cls)] == obj.kind
            cx, cy = (obj.box[0] + obj.box[2]) / 2 / scene.image.width, (obj.box[1] + obj.box[3]) / 2 / scene.image.height
            assert box[:2].tolist() == pytest.approx([cx, cy], abs=1e-6)
    # The mirrored scene's boxes are mirrored: centres at 1 - cx.
    torch.testing.assert_close(batch.labels[1]["boxes"][:, 0], 1 - batch.labels[0]["boxes"][:, 0])


def test_schedule_warms_up_then_decays_to_the_floor():
    config = LoopConfig(steps=1000, batch_size=1, lr=1.0, warmup_steps=100, min_lr_ratio=0.05)
    assert lr_factor(0, config) == pytest.approx(0.01)
    assert lr_factor(99, config) == pytest.approx(1.0)
    assert lr_factor(550, config) == pytest.approx(0.525)
    assert lr_factor(999, config) == pytest.approx(0.05, abs=1e-4)
    assert all(lr_factor(s, config) >= lr_factor(s + 1, config) for s in range(100, 999))


def test_time_budget_shortens_a_loop_inside_the_warm_up():
    config = LoopConfig(steps=10_000, batch_size=1, lr=1.0, warmup_steps=60, time_budget_s=0.4)
    budget = _Budget(config.time_budget_s)
    for step in range(51):
        config = budget.check(step, config, None, "test")
        time.sleep(0.004)
    # ~4 ms a step: 0.4 s fits about 100 steps, far fewer than 10,000, and never fewer than the warm-up.
    assert 61 <= config.steps <= 110


@pytest.mark.slow
def test_bubogpt_train_stage_grounding_under_ray(ray_session, tmp_path):
    """A micro recipe through Ray Train: assets come back as a checkpoint and load into the pipeline."""
    from bubogpt.grounding.pipeline import load_tiny_grounding
    from workflows.train_grounding import train_grounding

    micro = {
        "tagger": {"steps": 3, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1},
        "segmenter": {"steps": 2, "batch_size": 1, "lr": 1e-3, "warmup_steps": 1},
        "detector": {"steps": 3, "batch_size": 2, "lr": 3e-4, "warmup_steps": 1, "grad_clip": 0.1},
        "calibration_scenes": 3, "validation_scenes": 2, "evaluate_every": 0,
        "detector_resize_short": 96, "detector_resize_max": 160, "detector_short_sides": [96],
    }  # fmt: skip
    (tmp_path / "micro.json").write_text(json.dumps({"grounding": micro}))  # the `bubogpt train --config` shape
    from workflows.options import TrainOptions

    options = TrainOptions(out=tmp_path / "out", stage="grounding", config=tmp_path / "micro.json", seed=1, cpus_per_worker=1)
    scores = train_grounding(options)
    assert set(scores) == {"tag_precision", "tag_recall", "tag_f1", "box_precision", "box_recall", "mask_iou"}
    assets = tmp_path / "out" / "grounding_tiny"
    recorded = json.loads((assets / "training_scores.json").read_text())
    assert recorded["steps_run"] == {"tagger": 3, "segmenter": 2, "detector": 3} and recorded["config"]["seed"] == 1
    pipeline = load_tiny_grounding(assets)
    scene = next(draw_scenes(1, 1, "ray_test"))
    entities = pipeline.ground_image(scene.image)  # untrained: whatever it finds must be well formed
    for entity in entities:
        assert entity.label in TAGS and len(entity.boxes) == len(entity.masks)


def test_tagger_swin_from_detector_computes_the_detector_backbone(tmp_path):
    """The key table from transformers' Swin to RAM's: with equal windows (7 at 224 px) the two
    backbones compute the same last-stage tokens."""
    import dataclasses

    from bubogpt.grounding.ram import RAMTagger, ram_tiny
    from bubogpt.grounding.training import swin_from_detector

    torch.manual_seed(0)
    detector = build_tiny_grounding_dino(tmp_path, list(TAGS)).eval()
    with torch.no_grad():  # non-zero position tables, so that a misplaced one shows
        for name, param in detector.model.model.backbone.conv_encoder.model.named_parameters():
            if "relative_position_bias_table" in name:
                param.normal_(0, 0.5)
    tagger = RAMTagger(dataclasses.replace(ram_tiny(len(TAGS)), image_size=224, window_size=7)).eval()
    swin_from_detector(detector, tagger)
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = tagger.vision_encoder(pixels)  # (1, 49, 256)
        theirs = detector.model.model.backbone.conv_encoder.model(pixels).feature_maps[-1].flatten(2).transpose(1, 2)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # The tiny tagger's own window (4) takes resized tables.
    small = RAMTagger(ram_tiny(len(TAGS)))
    swin_from_detector(detector, small)
    assert small.vision_encoder.layers[0].blocks[0].attn.relative_position_bias_table.shape == (49, 1)
