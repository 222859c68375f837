"""A directory converted from released-format files is what the rest of the system takes: Ray Serve
answers an OpenAI-client request with it, and `bubogpt train --init` runs a step from it.

The released-format files are random modules of the sizes the prepared tiny corpus feeds (112 px
images, 128 x 204 fbank clips), saved as the original's files; the Vicuna is a small stand-in saved
with save_pretrained. Both tests share the session's Ray (and Serve, under their own route).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bubogpt.config import AudioEncoderConfig, QFormerConfig, VisionEncoderConfig
from released_fixtures import stand_in_vicuna, write_released_fixture

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    from bubogpt.data import sample_texts
    from workflows.cli import main

    root = tmp_path_factory.mktemp("released_e2e")
    audio = AudioEncoderConfig(embed_dim=48, num_blocks=1, num_heads=3, drop_path=0.0)
    vision = VisionEncoderConfig(img_size=112, patch_size=14, embed_dim=64, depth=1, num_heads=4)
    qformer = {m: QFormerConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, num_query_token=4,
                                encoder_width=width) for m, width in (("audio", 48), ("vision", 64))}  # fmt: skip
    fixture = write_released_fixture(root / "downloads", audio, vision, qformer, llm_hidden=64, seed=5)
    llm = stand_in_vicuna(root / "downloads" / "vicuna", 64, texts=list(sample_texts()))
    out = root / "models" / "bubogpt"
    code = main(["convert", "--imagebind", str(fixture / "imagebind_audio.pth"), "--eva", str(fixture / "eva_vit.pth"),
                 "--blip2", str(fixture / "blip2_pretrained.pth"), "--bubogpt", str(fixture / "bubogpt_release.pth"),
                 "--llm", str(llm), "--out", str(out), "--num-heads", "audio=3,vision=4,qformer=2"])  # fmt: skip
    assert code == 0
    return out


def test_serve_answers_an_openai_request_with_the_converted_model(converted, serve_app):
    """Deployed beside the session's application (its own name and route) on the same Serve."""
    import openai
    from ray import serve

    from serve.app import compose
    from serve.settings import ServeSettings
    from serve_harness import API_KEY, deployment_options_for_tests, image_bytes, scene, sound_bytes

    settings = ServeSettings(model_dir=str(converted), api_key=API_KEY, max_new_tokens=16, default_max_new_tokens=8)
    serve.run(compose(settings, deployment_options_for_tests()), name="converted", route_prefix="/converted", blocking=False)
    try:
        client = openai.OpenAI(base_url=serve_app.url + "/converted/v1", api_key=API_KEY, max_retries=3, timeout=180)
        content = [{"type": "text", "text": "What is it?"},
                   {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + _b64(image_bytes(scene(3).pixels))}},
                   {"type": "input_audio", "input_audio": {"data": _b64(sound_bytes("chirp")), "format": "wav"}}]  # fmt: skip
        assert _served_models(client) == ["bubogpt-custom"]  # the converted config's preset
        reply = client.chat.completions.create(model="bubogpt-custom", messages=[{"role": "user", "content": content}],
                                               max_tokens=6, temperature=0)  # fmt: skip
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.prompt_tokens > 2 * 4  # the two modalities' query tokens are in the prompt
        assert isinstance(reply.choices[0].message.content, str)
    finally:
        serve.delete("converted")


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def _served_models(client) -> list[str]:
    """The application may still be starting its replicas (its route answers 404 until then):
    wait until it lists its models (or 3 minutes)."""
    import time

    import openai

    deadline = time.monotonic() + 180
    while True:
        try:
            return [model.id for model in client.models.list().data]
        except (openai.APIConnectionError, openai.NotFoundError, openai.InternalServerError):
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def test_train_init_runs_a_step_from_the_converted_model(converted, ray_session, prepared_small_corpus, tmp_path):
    from bubogpt.checkpoints.native import load_model
    from workflows.cli import parse
    from workflows.train import run_training

    out = tmp_path / "run"
    _, options = parse([
        "train", "--data", str(prepared_small_corpus.prepared_dir), "--out", str(out), "--stage", "stage1",
        "--preset", "7b", "--init", str(converted), "--max-steps", "1", "--batch-size", "2", "--no-eval", "--no-samples",
    ])  # fmt: skip
    assert run_training(options) == 0
    trained, start = load_model(out / "model"), load_model(converted)
    # Stage 1 trains the audio Q-Former and projection; the frozen parts are unchanged.
    changed = {name for name, weight in trained.state_dict().items() if not torch.equal(weight, start.state_dict()[name])}
    assert changed and all(name.startswith(("joiner.qformers.audio.", "joiner.projections.audio.")) for name in changed)
    config = json.loads((out / "model" / "bubogpt_config.json").read_text())
    assert config["llm"]["path"] == json.loads((converted / "bubogpt_config.json").read_text())["llm"]["path"]  # still referenced
