"""The shipped pretrained tiny components (so far the audio encoder, bubogpt/assets/tiny_imagebind),
read through the original-format loaders and scored, with the heads they were trained with, on
generator samples of a stream and a seed their training never drew from (`pretraining.streams`)."""

from __future__ import annotations

import json

from bubogpt.pretraining.assets import ASSETS, AUDIO_DIR, read_audio_encoder
from bubogpt.pretraining.tiny_components import RecordingPool, score_audio
from bubogpt.preprocess import AudioPreprocessConfig

HELD_OUT_SEED = 7  # the assets were trained with seed 0 on the "*_train" streams


def test_audio_encoder_asset_tells_the_kind_of_unseen_sounds():
    encoder, heads = read_audio_encoder()
    sounds = RecordingPool(HELD_OUT_SEED, "test_sounds", 60, AudioPreprocessConfig(num_clips=3))
    scores = score_audio(encoder, heads, sounds)
    assert scores["kind_accuracy"] >= 0.95, scores


def test_pretrained_assets_are_small_and_documented():
    folders = [AUDIO_DIR]
    files = [p for folder in folders for p in folder.rglob("*") if p.is_file()]
    # Issue 16: all pretrained tiny components together at most 25 MB.
    assert sum(p.stat().st_size for p in files) <= 25 * 1024 * 1024
    for folder in folders:
        readme = (folder / "README.md").read_text()
        recorded = json.loads((folder / "training_scores.json").read_text())
        assert f"--phase {recorded['phase']}" in readme and f"--seed {recorded['seed']}" in readme, folder
        assert folder.parent == ASSETS
