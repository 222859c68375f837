"""SAM: loading checkpoints in the released format (saved from segment-anything's own builder),
the presets against segment-anything's builders, and small-region cleaning."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.build_sam import _build_sam, build_sam_vit_b, build_sam_vit_h, build_sam_vit_l

from bubogpt.checkpoints.common import CheckpointMismatchError
from bubogpt.grounding.segmenter import (
    SamSegmenter,
    clean_mask,
    infer_sam_config,
    load_sam,
    region_area_threshold,
    sam_vit_b,
    sam_vit_h,
    sam_vit_l,
)


@pytest.fixture(scope="module")
def released_format_checkpoint(tmp_path_factory):
    """A tiny SAM built by segment-anything's own `_build_sam` and saved as the release is: a bare
    state dict. Its mask decoder keeps the released sizes (256 wide); the encoder is tiny."""
    torch.manual_seed(0)
    sam = _build_sam(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[])
    # Random (not zero) relative positions and decoder output weights, so that a wrongly loaded
    # tensor would change the masks.
    with torch.no_grad():
        for name, param in sam.named_parameters():
            if "rel_pos" in name or "output_hypernetworks" in name:
                param.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("sam") / "sam_tiny_release_format.pth"
    torch.save(sam.state_dict(), path)
    return sam.eval(), path


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 128, np.uint8)
    image[20:70, 30:90] = rng.integers(0, 255, size=3)
    return image + rng.integers(0, 8, size=image.shape, dtype=np.uint8)


def test_loader_reads_the_release_format_and_matches_segment_anything(released_format_checkpoint):
    original, path = released_format_checkpoint
    loaded = load_sam(path)  # config inferred from the shapes
    image = _image(90, 130)  # not square
    boxes = np.array([[25, 15, 95, 75], [0, 0, 60, 40]], dtype=np.float32)
    # segment-anything's own predictor on the model it built, all boxes at once (one embedding).
    predictor = SamPredictor(original)
    predictor.set_image(image)
    transformed = predictor.transform.apply_boxes_torch(torch.from_numpy(boxes), (90, 130))
    expected, _, _ = predictor.predict_torch(None, None, boxes=transformed, multimask_output=False, return_logits=True)
    segmenter = SamSegmenter(loaded, min_region_area=0)
    logits = segmenter.mask_logits(image, boxes)
    assert logits.shape == (2, 90, 130)
    torch.testing.assert_close(logits, expected[:, 0], atol=1e-4, rtol=0)
    masks = segmenter.masks_from_logits(logits)
    assert masks.dtype == bool
    np.testing.assert_array_equal(masks, (expected[:, 0] > 0).numpy())


def test_loader_refuses_mismatched_checkpoints(released_format_checkpoint, tmp_path):
    _, path = released_format_checkpoint
    state = torch.load(path, weights_only=True)
    extra = dict(state, **{"mask_decoder.unknown.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointMismatchError, match="unknown"):
        load_sam(tmp_path / "extra.pth")
    missing = {k: v for k, v in state.items() if k != "mask_decoder.iou_token.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointMismatchError, match="iou_token"):
        load_sam(tmp_path / "missing.pth", infer_sam_config(state))
    wider = dataclasses.replace(infer_sam_config(state), encoder_embed_dim=64)
    with pytest.raises(CheckpointMismatchError, match=r"image_encoder.pos_embed: checkpoint \(1, 64, 64, 32\) vs model \(1, 64, 64, 64\)"):
        load_sam(path, wider)  # the error names the key and both shapes
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="cannot read"):
        load_sam(tmp_path / "garbage.pth")


@pytest.mark.parametrize("preset, builder", [(sam_vit_h, build_sam_vit_h), (sam_vit_l, build_sam_vit_l), (sam_vit_b, build_sam_vit_b)])
def test_presets_equal_the_released_architectures(preset, builder):
    from bubogpt.grounding.segmenter import build_sam

    with torch.device("meta"):  # shapes only: no memory, no time
        released = builder().state_dict()
        ours = build_sam(preset()).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in released.items()}
    assert infer_sam_config(released) == preset()


def test_small_holes_and_islands_are_removed_and_the_threshold_scales():
    assert region_area_threshold(1024, 1024) == 400
    assert region_area_threshold(2048, 2048) == 400  # never above the reference's 400 px
    assert region_area_threshold(256, 256) == pytest.approx(25)
    mask = np.zeros((100, 100), bool)
    mask[10:60, 10:60] = True  # 2500 px object
    mask[30:33, 30:33] = False  # a 9 px hole
    mask[80:83, 80:83] = True  # a 9 px island
    cleaned = clean_mask(mask, area=20)
    assert cleaned[30:33, 30:33].all() and not cleaned[80:83, 80:83].any()
    assert cleaned.sum() == 2500
    # Below the area nothing changes.
    np.testing.assert_array_equal(clean_mask(mask, area=5), mask)
