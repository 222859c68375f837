"""Grounding DINO: the original-checkpoint path through groundingdino-py (a checkpoint saved from its
own builder, in the release's format), caption chunking, thresholds and class-aware NMS."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bubogpt.checkpoints.common import CheckpointMismatchError
from bubogpt.grounding.detector import (
    CaptionChunk,
    Detection,
    DetectorConfig,
    DetectorInputError,
    GroundingDetector,
    OriginalGroundingDinoConfig,
    build_original_grounding_dino,
    chunk_tags,
    class_aware_nms,
    detector_transform,
    load_original_grounding_dino,
    resized_size,
    select_detections,
    write_detector_vocab,
)

# groundingdino-py fixes the text position embedding at 256 wide, so hidden_dim stays 256; the rest is small.
TINY_ORIGINAL = OriginalGroundingDinoConfig(hidden_dim=256, nheads=8, enc_layers=1, dec_layers=1,
                                            dim_feedforward=128, num_queries=12)  # fmt: skip
WORDS = ["circle", "square", "triangle", "star", "hexagon", "cross", "red", "traffic", "light", "dog"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A small local BERT directory (what bert-base-uncased would be, at a tiny size)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    directory = tmp_path_factory.mktemp("bert")
    write_detector_vocab(directory / "vocab.txt", WORDS)
    tokenizer = BertTokenizer(str(directory / "vocab.txt"))
    tokenizer.save_pretrained(directory)
    torch.manual_seed(1)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)  # fmt: skip
    BertModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def released_format(bert_dir, tmp_path_factory):
    """groundingdino-py's builder (Swin-T, a small transformer) saved as `groundingdino_swint_ogc.pth` is:
    {"model": {"module." + key: tensor}}, with the training-only `label_enc.weight` in it."""
    torch.manual_seed(0)
    model = build_original_grounding_dino(TINY_ORIGINAL, bert_dir).eval()
    with torch.no_grad():
        for param in model.bbox_embed.parameters():  # non-zero box heads: boxes differ between queries
            param.normal_(0, 0.05)
        model.transformer.decoder.norm.weight.mul_(0.05)  # unsaturated token probabilities: thresholds matter
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.label_enc.weight"] = torch.zeros(2001, 256)
    path = tmp_path_factory.mktemp("gdino") / "groundingdino_tiny.pth"
    torch.save({"model": state, "epoch": 0}, path)
    return model, path


def _image(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = np.full((height, width, 3), 120, np.uint8)
    pixels[10:40, 20:70] = (220, 40, 40)
    return Image.fromarray(np.clip(pixels + rng.integers(0, 20, pixels.shape), 0, 255).astype(np.uint8))


def test_resize_matches_groundingdino_py():
    import groundingdino.datasets.transforms as T

    for width, height in [(640, 480), (480, 640), (200, 1000), (1000, 200), (800, 800), (333, 517)]:
        image = Image.new("RGB", (width, height))
        resized, _ = T.RandomResize([800], max_size=1333)(image, None)
        assert resized_size(width, height, 800, 1333) == (resized.height, resized.width)


def test_loads_the_release_format_and_computes_what_groundingdino_py_computes(released_format, bert_dir):
    import groundingdino.datasets.transforms as T
    from groundingdino.util.inference import predict

    original, path = released_format
    loaded = load_original_grounding_dino(path, bert_dir, TINY_ORIGINAL)
    image = _image(150, 100)  # not square
    # Same pixels as groundingdino-py's own transform (at a small size to keep the test fast).
    theirs = T.Compose([T.RandomResize([224], max_size=400), T.ToTensor(),
                        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])(image, None)[0]  # fmt: skip
    pixels = detector_transform(image, 224, 400)
    torch.testing.assert_close(pixels, theirs)
    caption = "red circle . square . dog ."
    with torch.no_grad():
        expected = original(pixels[None], captions=[caption])
        logits, boxes = loaded.predict(pixels[None], [caption])
    torch.testing.assert_close(logits, expected["pred_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(boxes, expected["pred_boxes"], atol=1e-5, rtol=0)

    # Detections against groundingdino-py's `predict`: same kept queries, boxes scaled to the original
    # image in xyxy (nothing suppressed at nms_iou=1).
    best = expected["pred_logits"][0].sigmoid().max(dim=1).values
    assert best.min() < best.max() < 1  # the queries differ
    box_threshold = float(best.median())
    their_boxes, their_scores, _ = predict(original, pixels, caption, box_threshold, 0.0, device="cpu")
    settings = DetectorConfig(box_threshold=box_threshold, text_threshold=0.0, nms_iou=1.0, resize_short=224, resize_max=400)
    ours = GroundingDetector(loaded, settings).detect(image, ["red circle", "square", "dog"])
    ours = sorted(ours, key=lambda d: -d.box_score)
    assert len(ours) == len(their_boxes) > 0
    cx, cy, w, h = their_boxes.unbind(-1)
    their_xyxy = torch.stack([(cx - w / 2) * 150, (cy - h / 2) * 100, (cx + w / 2) * 150, (cy + h / 2) * 100], -1)
    their_xyxy[:, 0::2] = their_xyxy[:, 0::2].clamp(0, 150)
    their_xyxy[:, 1::2] = their_xyxy[:, 1::2].clamp(0, 100)
    order = torch.argsort(their_scores, descending=True)
    torch.testing.assert_close(torch.tensor([d.box for d in ours]), their_xyxy[order], atol=1e-3, rtol=0)
    torch.testing.assert_close(torch.tensor([d.box_score for d in ours]), their_scores[order], atol=1e-5, rtol=0)


def test_loader_refuses_mismatched_checkpoints(released_format, bert_dir, tmp_path):
    _, path = released_format
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["model"]
    bad_shape = dict(state, **{"module.feat_map.weight": torch.zeros(256, 31)})
    torch.save({"model": bad_shape}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointMismatchError, match=r"feat_map.weight: checkpoint \(256, 31\) vs model \(256, 32\)"):
        load_original_grounding_dino(tmp_path / "shape.pth", bert_dir, TINY_ORIGINAL)
    torch.save({"model": {k: v for k, v in state.items() if "transformer.tgt_embed" not in k}}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointMismatchError, match="tgt_embed"):
        load_original_grounding_dino(tmp_path / "missing.pth", bert_dir, TINY_ORIGINAL)
    torch.save({"model": dict(state, **{"module.extra_head.weight": torch.zeros(1)})}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointMismatchError, match="extra_head"):
        load_original_grounding_dino(tmp_path / "extra.pth", bert_dir, TINY_ORIGINAL)
    with pytest.raises(FileNotFoundError, match="not a local BERT directory"):
        load_original_grounding_dino(path, tmp_path, TINY_ORIGINAL)


def test_tags_are_chunked_to_fit_the_text_limit(bert_dir):
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(bert_dir)
    # Multi-word and unknown (spelled out letter by letter) tags: far more than one caption holds.
    tags = [f"red {WORDS[i % len(WORDS)]} {'x' * (i % 7 + 1)} {i}" for i in range(120)] + ["Traffic. Light?"]
    chunks = chunk_tags(tags, tokenizer, 256)
    assert len(chunks) > 1
    assert [t for c in chunks for t in c.tags] == tags  # every tag once, in order
    for chunk in chunks:
        ids = tokenizer(chunk.caption)["input_ids"]
        assert len(ids) <= 256 and chunk.caption.endswith(".")
        tokens = tokenizer.convert_ids_to_tokens(ids)
        for tag, (start, end) in zip(chunk.tags, chunk.spans):
            cleaned = tag.replace(".", " ").replace("?", " ").lower()
            assert tokens[start:end] == tokenizer.tokenize(cleaned)
            assert tokens[end] == "."
    with pytest.raises(DetectorInputError, match="empty"):
        chunk_tags(["..."], tokenizer, 256)


def test_thresholds_and_class_aware_nms():
    chunk = CaptionChunk("circle . red star .", ["circle", "red star"], [(1, 2), (3, 5)])
    # Tokens: [CLS] circle . red star . [SEP] -> 7; queries: strong circle, strong star, weak, special-token only.
    logits = torch.full((4, 256), -10.0)
    logits[0, 1] = 3.0
    logits[1, 4] = 2.0
    logits[2, 1] = -1.5  # p = 0.18: below the box threshold
    logits[3, 0] = 3.0  # only [CLS] fires: passes the box threshold, but no phrase passes the text threshold
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]] * 4)
    found = select_detections(logits, boxes, chunk, 7, (200, 100), box_threshold=0.25, text_threshold=0.2)
    assert [(d.label, round(d.score, 3)) for d in found] == [("circle", 0.953), ("red star", 0.881)]
    assert found[0].box == pytest.approx((80.0, 30.0, 120.0, 70.0))  # x scaled by 200, y by 100

    a = Detection("circle", (0, 0, 10, 10), 0.9)
    b = Detection("circle", (1, 1, 10, 10), 0.8)  # IoU 0.81 with a: suppressed
    c = Detection("star", (0, 0, 10, 10), 0.7)  # same box, other label: kept
    d = Detection("circle", (50, 50, 60, 60), 0.6)  # same label, elsewhere: kept
    assert class_aware_nms([b, c, a, d], 0.5) == [a, c, d]
