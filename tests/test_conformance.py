import shutil
import subprocess
import sys

import torch

from bubogpt.checkpoints.bubogpt_joiner import load_bubogpt_joiner
from bubogpt.checkpoints.common import CheckpointMismatchError
from bubogpt.config import QFormerConfig
from bubogpt.modeling_qformer import MultimodalJoiner
import pytest


def run_conformance(directory):
    return subprocess.run(
        [sys.executable, "-m", "bubogpt.conformance", str(directory)],
        capture_output=True, text=True, timeout=300,
    )


def test_conformance_passes_on_golden_fixture(golden_dir):
    result = run_conformance(golden_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split(":")[0] for line in result.stdout.splitlines()}
    assert {"audio_tokens", "vision_tokens", "joiner_audio", "joiner_vision"} <= lines


def test_conformance_fails_when_a_weight_is_perturbed(golden_dir, tmp_path):
    fixture = tmp_path / "fixture"
    shutil.copytree(golden_dir, fixture)
    state = torch.load(fixture / "eva_vit.pth", weights_only=True)
    state["blocks.0.attn.q_bias"] = state["blocks.0.attn.q_bias"] + 0.05
    torch.save(state, fixture / "eva_vit.pth")
    result = run_conformance(fixture)
    assert result.returncode == 1
    assert "vision_tokens" in result.stdout and "FAIL" in result.stdout


def test_mismatched_joiner_checkpoint_names_key_and_shapes(golden_dir):
    # A 13B-style projection into a 7B-style LLM, in miniature: the fixture projects to 48.
    q = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, num_query_token=4)
    joiner = MultimodalJoiner(QFormerConfig(**q, encoder_width=64), QFormerConfig(**q, encoder_width=40), 64)
    with pytest.raises(CheckpointMismatchError) as error:
        load_bubogpt_joiner(joiner, golden_dir / "bubogpt_joiner.pth")
    message = str(error.value)
    assert "projections.audio.fc.weight" in message
    assert "(48, 32)" in message and "(64, 32)" in message


def test_missing_key_is_refused(golden_dir, tmp_path):
    state = torch.load(golden_dir / "bubogpt_joiner.pth", weights_only=True)
    del state["model"]["multimodal_joiner.modality_qformers.vision.query_tokens"]
    torch.save(state, tmp_path / "joiner.pth")
    q = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, num_query_token=4)
    joiner = MultimodalJoiner(QFormerConfig(**q, encoder_width=64), QFormerConfig(**q, encoder_width=40), 48)
    with pytest.raises(CheckpointMismatchError, match="qformers.vision.query_tokens"):
        load_bubogpt_joiner(joiner, tmp_path / "joiner.pth")


def test_params_7b_stage2_matches_reference():
    result = subprocess.run([sys.executable, "-m", "bubogpt.params", "7b"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {line.rsplit(None, 1)[0].strip(): int(line.rsplit(None, 1)[1].replace(",", "")) for line in result.stdout.splitlines()}
    assert rows["stage 2 trainable (both projections)"] == 2 * (768 * 4096 + 4096)
    # Vicuna-7B (Llama-7B) has 6,738,415,616 parameters.
    assert rows["LLM"] == 6_738_415_616


def test_conformance_recognises_a_ram_fixture(golden_dir):
    result = run_conformance(golden_dir.parent / "ram_tiny")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "logits max abs error" in result.stdout


# --- the released layout (bubogpt_release.pth: no vision Q-Former) ---------------------------------


def test_conformance_checks_and_names_the_released_layout(golden_dir):
    result = run_conformance(golden_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    released = [line for line in result.stdout.splitlines() if "bubogpt_release.pth" in line]
    assert len(released) == 2 and all(line.endswith("[ok]") for line in released), result.stdout


def test_conformance_names_the_released_file_when_it_fails_to_load(golden_dir, tmp_path):
    fixture = tmp_path / "fixture"
    shutil.copytree(golden_dir, fixture)
    state = torch.load(fixture / "bubogpt_release.pth", weights_only=True)
    del state["model"]["multimodal_joiner.modality_qformers.audio.query_tokens"]
    torch.save(state, fixture / "bubogpt_release.pth")
    result = run_conformance(fixture)
    assert result.returncode == 1
    line = next(line for line in result.stdout.splitlines() if line.startswith("bubogpt_release.pth"))
    assert "qformers.audio.query_tokens (1, 4, 32)" in line and "FAIL" in line


def test_released_joiner_takes_its_vision_qformer_from_blip2(golden_dir):
    # eval_configs/mmgpt4_eval.yaml:16 (use_blip_vision) -> replace_joiner_vision (image_bind.py:654-657)
    # builds the vision Q-Former from BLIP-2, then the file is loaded with strict=False (mm_gpt4.py:307).
    q = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, num_query_token=4)
    make = lambda: MultimodalJoiner(QFormerConfig(**q, encoder_width=64), QFormerConfig(**q, encoder_width=40), 48)  # noqa: E731
    with pytest.raises(CheckpointMismatchError, match="bubogpt_release.pth holds no vision Q-Former"):
        load_bubogpt_joiner(make(), golden_dir / "bubogpt_release.pth")
    released, full = make(), make()
    report = load_bubogpt_joiner(released, golden_dir / "bubogpt_release.pth", blip2=golden_dir / "blip2_pretrained.pth")
    assert "vision Q-Former from blip2_pretrained.pth" in report.source
    assert report.unexpected == [] and len(report.ignored) > 0  # the audio Q-Former's text side: known, unused
    load_bubogpt_joiner(full, golden_dir / "bubogpt_joiner.pth", blip2=golden_dir / "blip2_pretrained.pth")
    for (name, a), (_, b) in zip(released.state_dict().items(), full.state_dict().items()):
        assert torch.equal(a, b), name  # the fixture's two layouts are the same weights


def test_unknown_keys_are_listed_and_skipped(golden_dir, tmp_path):
    state = torch.load(golden_dir / "bubogpt_joiner.pth", weights_only=True)
    state["model"]["llama_model.model.embed_tokens.weight"] = torch.zeros(3, 2)  # e.g. a full-model export
    state["model"]["multimodal_joiner.modality_qformers.audio.Qformer.bert.pooler.dense.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "joiner.pth")
    q = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, num_query_token=4)
    joiner = MultimodalJoiner(QFormerConfig(**q, encoder_width=64), QFormerConfig(**q, encoder_width=40), 48)
    report = load_bubogpt_joiner(joiner, tmp_path / "joiner.pth")
    assert report.unexpected == ["llama_model.model.embed_tokens.weight", "qformers.audio.pooler.dense.weight"]
    assert len(report.loaded) == len(joiner.state_dict())
