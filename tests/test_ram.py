"""RAM tagger: conformance with the original, strict checkpoint loading, other input sizes."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image
import torch
import torch.nn.functional as F

from bubogpt.grounding.ram import (
    RAMConfig,
    RAMInputError,
    RAMTagger,
    SwinBlock,
    ram_swin_large,
    preprocess_image,
    ram_tiny,
    window_attention_mask,
)
from bubogpt.grounding.ram_checkpoint import (
    CheckpointMismatchError,
    infer_ram_config,
    load_ram_state_dict,
    load_ram_tagger,
    read_ram_checkpoint,
    read_tag_thresholds,
)
from bubogpt.grounding.ram_conformance import check_ram_fixture

from conftest import GOLDEN  # the repository's ../shared/golden

FIXTURE = GOLDEN / "ram_tiny"


@pytest.fixture(scope="module")
def ram_fixture() -> Path:
    """The golden RAM fixture; missing, the tests that read it FAIL (a skip would hide it)."""
    names = ("ram.pth", "tags.txt", "tag_thresholds.txt", "config.json", "io.pt")
    missing = [name for name in names if not (FIXTURE / name).is_file()]
    if missing:
        pytest.fail(f"golden RAM fixture incomplete at {FIXTURE}: missing {missing}")
    return FIXTURE


needs_fixture = pytest.mark.usefixtures("ram_fixture")

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def golden(ram_fixture):
    model, thresholds, report = load_ram_tagger(
        FIXTURE / "ram.pth", FIXTURE / "tags.txt", FIXTURE / "tag_thresholds.txt", FIXTURE / "config.json"
    )
    io = torch.load(FIXTURE / "io.pt", map_location="cpu", weights_only=True)
    config_json = json.loads((FIXTURE / "config.json").read_text())
    return model, thresholds, report, io, config_json


# --- conformance with the original implementation -------------------------------------------------


@needs_fixture
def test_golden_fixture_conforms(capsys):
    assert check_ram_fixture(FIXTURE) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "differing from the original: 0 of" in out


@needs_fixture
def test_logits_and_tags_match_the_original(golden):
    model, thresholds, _, io, config_json = golden
    with torch.no_grad():
        logits = model(io["image"])
    torch.testing.assert_close(logits, io["logits"], atol=1e-4, rtol=0)
    # `tag` against the strings the original generate_tag printed.
    expected = [text.split(" | ") for text in config_json["reference_generate_tag"]]
    assert model.tag(io["image"], thresholds) == expected


@needs_fixture
def test_conformance_fails_when_outputs_differ(tmp_path):
    # The checker must notice a logit off by more than the tolerance, and a single flipped decision.
    for name in ("ram.pth", "tags.txt", "tag_thresholds.txt", "config.json"):
        shutil.copy(FIXTURE / name, tmp_path / name)
    io = torch.load(FIXTURE / "io.pt", map_location="cpu", weights_only=True)

    shifted = dict(io, logits=io["logits"].clone())
    shifted["logits"][0, 3] += 1e-3
    torch.save(shifted, tmp_path / "io.pt")
    assert check_ram_fixture(tmp_path) == 1

    flipped = dict(io, tags_decided=io["tags_decided"].clone())
    flipped["tags_decided"][1, 0] = 1 - flipped["tags_decided"][1, 0]
    torch.save(flipped, tmp_path / "io.pt")
    assert check_ram_fixture(tmp_path) == 1


@needs_fixture
def test_load_report_accounts_for_every_key(golden):
    _, _, report, _, _ = golden
    checkpoint = read_ram_checkpoint(FIXTURE / "ram.pth")
    ignored = sum(len(keys) for keys in report.ignored.values())
    assert report.loaded + ignored == len(checkpoint) == 246
    groups = {"tag_encoder.*", "text_decoder.*", "*.relative_position_index", "*.attn_mask"}
    assert set(report.ignored) == groups
    assert all(key.startswith("tag_encoder.") for key in report.ignored["tag_encoder.*"])


@needs_fixture
def test_config_inferred_from_shapes_matches_fixture_config():
    checkpoint = read_ram_checkpoint(FIXTURE / "ram.pth")
    config_json = json.loads((FIXTURE / "config.json").read_text())
    config = infer_ram_config(checkpoint)  # no config.json: shapes (and the saved attn_mask) only
    assert config.image_size == config_json["image_size"]
    assert config.embed_dim == config_json["embed_dim"]
    assert config.depths == config_json["depths"]
    assert config.num_heads == config_json["num_heads"]
    assert config.window_size == config_json["window_size"]
    assert config.vision_width == config_json["vision_width"]
    assert config.tag_head_hidden == config_json["bert_hidden"]
    assert config.tag_head_intermediate == config_json["bert_intermediate"]
    assert config.tag_head_layers == config_json["q2l_layers"]
    assert config.num_tags == len(config_json["tags"])
    # The head count is in no shape: only config.json can give it.
    assert infer_ram_config(checkpoint, config_json).tag_head_heads == config_json["bert_heads"]


# --- strict loading -------------------------------------------------------------------------------


@needs_fixture
def test_wrong_shape_is_refused_naming_key_and_shapes(golden):
    model = golden[0]
    checkpoint = dict(read_ram_checkpoint(FIXTURE / "ram.pth"))
    key = "tagging_head.encoder.layer.1.intermediate.dense.weight"
    checkpoint[key] = torch.zeros(65, 32)
    before = model.tagging_head[1].ffn_in.weight.clone()
    with pytest.raises(CheckpointMismatchError) as error:
        load_ram_state_dict(model, checkpoint)
    message = str(error.value)
    assert key in message and "(65, 32)" in message and "(64, 32)" in message
    assert torch.equal(model.tagging_head[1].ffn_in.weight, before)  # nothing half-loaded


@needs_fixture
def test_missing_and_contradicting_keys_raise_unknown_keys_are_reported():
    checkpoint = read_ram_checkpoint(FIXTURE / "ram.pth")
    config = infer_ram_config(checkpoint, json.loads((FIXTURE / "config.json").read_text()))

    dropped = "visual_encoder.layers.2.blocks.1.attn.qkv.bias"
    missing = {k: v for k, v in checkpoint.items() if k != dropped}
    with pytest.raises(CheckpointMismatchError, match=re.escape(dropped)):
        load_ram_state_dict(RAMTagger(config), missing)

    # Keys the tagger has no use for are listed and skipped (the original loads with strict=False).
    unknown = dict(checkpoint, **{"visual_encoder.head.weight": torch.zeros(3, 3), "extra.bias": torch.zeros(2)})
    report = load_ram_state_dict(RAMTagger(config), unknown)
    assert report.unexpected == ["extra.bias", "visual_encoder.head.weight"]

    with pytest.raises(CheckpointMismatchError, match="embed_dim=24"):
        infer_ram_config(checkpoint, {"embed_dim": 24})


def test_thresholds_file_must_have_one_number_per_tag(tmp_path):
    path = tmp_path / "thresholds.txt"
    path.write_text("0.5\n0.7\n")
    assert read_tag_thresholds(path, 2).tolist() == pytest.approx([0.5, 0.7])
    with pytest.raises(CheckpointMismatchError, match="2 thresholds, but the checkpoint has 3"):
        read_tag_thresholds(path, 3)
    path.write_text("0.5\nhigh\n")
    with pytest.raises(CheckpointMismatchError, match="not a number"):
        read_tag_thresholds(path, 2)


# --- presets and other input sizes ----------------------------------------------------------------


def test_swin_large_preset_has_the_released_shapes():
    with torch.device("meta"):  # 4585 tags and Swin-L: no need to allocate
        model = RAMTagger(ram_swin_large())
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert shapes["vision_encoder.patch_embed.proj.weight"] == (192, 3, 4, 4)
    assert sum(k.endswith("attn.qkv.weight") for k in shapes) == 2 + 2 + 18 + 2
    # Window 12 everywhere: (2 * 12 - 1)^2 = 529 relative positions; 48 heads in the last stage.
    assert shapes["vision_encoder.layers.3.blocks.1.attn.relative_position_bias_table"] == (529, 48)
    assert shapes["image_proj.weight"] == (512, 1536)
    assert shapes["label_embed"] == (4585, 512)
    assert shapes["label_proj.weight"] == (768, 512)
    assert shapes["tagging_head.1.key.weight"] == (768, 512)
    assert shapes["classifier.weight"] == (1, 768)
    # 384 px: grids 96, 48, 24, 12; the last fits one window, so it has no shift.
    assert [ram_swin_large().stage_window(i) for i in range(4)] == [(12, 6), (12, 6), (12, 6), (12, 0)]


def test_tiny_preset_handles_non_square_and_odd_sizes():
    torch.manual_seed(0)
    model = RAMTagger(ram_tiny(num_tags=5)).eval()
    images = torch.randn(2, 3, 100, 150)  # grids 25x38 -> 13x19 -> 7x10 -> 4x5: padding and masks
    with torch.no_grad():
        logits = model(images)
        one_by_one = torch.cat([model(images[:1]), model(images[1:])])
    assert logits.shape == (2, 5)
    # Batching must not mix images (the masks are shared across the batch).
    torch.testing.assert_close(logits, one_by_one, atol=1e-5, rtol=0)
    # A size that is not a multiple of the patch is zero-padded: same as padding the pixels ourselves.
    odd = torch.randn(1, 3, 126, 127)
    with torch.no_grad():
        torch.testing.assert_close(model(odd), model(F.pad(odd, (0, 1, 0, 2))), atol=1e-5, rtol=0)
    with pytest.raises(RAMInputError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(3, 128, 128))


def test_padded_tokens_are_masked_out_of_window_attention():
    # A 5x5 grid in one 7x7 window: the block must equal plain attention over the 25 real tokens with
    # the relative-position bias of their coordinate differences (computed here from the definition).
    torch.manual_seed(0)
    config = RAMConfig(embed_dim=8, depths=[1], num_heads=[2], window_size=7, image_size=28)
    block = SwinBlock(8, 2, window=7, shift=0, config=config).eval()
    torch.nn.init.normal_(block.attn.relative_position_bias_table)
    x = torch.randn(1, 25, 8)
    mask = window_attention_mask(5, 5, 7, 0, x.device)
    with torch.no_grad():
        out = block(x, 5, 5, mask)

        h = block.norm1(x)[0]
        q, k, v = block.attn.qkv(h).view(25, 3, 2, 4).permute(1, 2, 0, 3)  # each (heads, 25, 4)
        rows, cols = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()
        index = (rows[:, None] - rows[None, :] + 6) * 13 + (cols[:, None] - cols[None, :] + 6)
        bias = block.attn.relative_position_bias_table[index].permute(2, 0, 1)  # (heads, 25, 25)
        attn = (q @ k.transpose(1, 2) / math.sqrt(4) + bias).softmax(-1)
        mixed = (attn @ v).transpose(0, 1).reshape(25, 8)
        expected = x[0] + block.attn.proj(mixed)
        expected = expected + block.mlp(block.norm2(expected))
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=0)


def test_tag_needs_names_and_one_threshold_per_tag():
    model = RAMTagger(ram_tiny(num_tags=3), tag_names=["a", "b", "c"]).eval()
    images = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        logits = model(images)
    # Threshold just below / above each tag's own probability: exactly the tags below are kept.
    probs = torch.sigmoid(logits[0])
    thresholds = torch.where(torch.arange(3) == 1, probs + 1e-3, probs - 1e-3)
    assert model.tag(images, thresholds) == [["a", "c"]]
    with pytest.raises(RAMInputError, match="one per tag"):
        model.tag(images, torch.tensor([0.5, 0.5]))
    with pytest.raises(RAMInputError, match="without tag_names"):
        RAMTagger(ram_tiny(num_tags=3)).tag(images, 0.5)


def test_preprocess_resizes_and_normalises_with_imagenet_statistics():
    image = Image.new("L", (50, 30), color=200)  # grey, wrong size, not RGB
    pixels = preprocess_image(image, 64)
    assert pixels.shape == (3, 64, 64)
    expected = [(200 / 255 - mean) / std for mean, std in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    torch.testing.assert_close(pixels.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5, rtol=0)


# --- older RAM files: the tagging head named vision_multi.* ----------------------------------------


@needs_fixture
def test_vision_multi_is_read_as_tagging_head(tmp_path):
    # The original's load_checkpoint_swinlarge renames vision_multi -> tagging_head and loads with
    # strict=False (ram/models/utils.py:270-274): such a file gives the same tagger.
    checkpoint = read_ram_checkpoint(FIXTURE / "ram.pth")
    old = {k.replace("tagging_head.", "vision_multi.", 1): v for k, v in checkpoint.items()}
    assert sum(k.startswith("vision_multi.") for k in old) > 0 and not any(k.startswith("tagging_head.") for k in old)
    old["tagging_head.embeddings.LayerNorm.weight"] = torch.ones(32)  # a part the original deletes: unused
    torch.save({"model": old}, tmp_path / "ram.pth")
    files = [FIXTURE / name for name in ("tags.txt", "tag_thresholds.txt", "config.json")]
    model, _, report = load_ram_tagger(tmp_path / "ram.pth", *files)
    reference, _, _ = load_ram_tagger(FIXTURE / "ram.pth", *files)
    assert report.renamed_old_head == sum(k.startswith("tagging_head.") for k in checkpoint)
    assert report.unexpected == ["tagging_head.embeddings.LayerNorm.weight"]
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    io = torch.load(FIXTURE / "io.pt", map_location="cpu", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model(io["image"]), io["logits"], atol=1e-4, rtol=0)


@needs_fixture
def test_missing_tagger_tensor_names_the_file_key_and_shape(tmp_path):
    checkpoint = dict(read_ram_checkpoint(FIXTURE / "ram.pth"))
    del checkpoint["tagging_head.encoder.layer.1.output.dense.weight"]
    torch.save({"model": checkpoint}, tmp_path / "ram_broken.pth")
    files = [FIXTURE / name for name in ("tags.txt", "tag_thresholds.txt", "config.json")]
    with pytest.raises(CheckpointMismatchError) as error:
        load_ram_tagger(tmp_path / "ram_broken.pth", *files)
    message = str(error.value)
    assert "ram_broken.pth" in message and "tagging_head.encoder.layer.1.output.dense.weight (32, 64)" in message
