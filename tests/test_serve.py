"""The Serve application over HTTP: every input combination, multi-turn caching, the OpenAI
endpoint through the official client (streaming and not), allow-listed media URLs.

Independent checks: each answer is compared with the model library called directly in this process
(same model directory: preprocess -> Conversation -> BuboGPT.generate, greedy), and each grounding
result with the grounding pipeline called directly on the decoded image.
"""

import base64
import concurrent.futures
import dataclasses
import io

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from bubogpt.checkpoints.native import load_model
from bubogpt.conversation import Conversation
from bubogpt.preprocess import (
    AudioPreprocessConfig,
    ImagePreprocessConfig,
    decode_image,
    image_transform,
    load_audio_fbank,
)
from serve_harness import API_KEY, b64, data_url, image_bytes, scene, sound_bytes, source_sound


@pytest.fixture(scope="module")
def reference(serve_app):
    """The same model directory, loaded here: what the server's answers must equal."""
    return load_model(serve_app.model_dir)


@pytest.fixture(scope="module")
def direct_grounding(serve_app):
    """The grounding pipeline from the server's weights, called directly: what the server's must equal."""
    from bubogpt.grounding.pipeline import TINY_ASSETS, load_tiny_grounding

    return load_tiny_grounding(serve_app.settings["grounding_dir"] or TINY_ASSETS)


def reference_answer(model, turns, image=None, audio=None, max_new_tokens=12):
    """turns: [(role, text)], the media opening the first user turn. Greedy, like temperature 0."""
    conversation = Conversation()
    modalities = [m for m, media in (("vision", image), ("audio", audio)) if media is not None]
    for i, (role, text) in enumerate(turns):
        if role == "user":
            conversation.add_user(text, modalities if i == 0 else ())
        else:
            conversation.add_assistant(text)
    pixels = fbank = None
    if image is not None:
        pixels = image_transform(ImagePreprocessConfig.for_model(model.config))(decode_image(image))[None]
    if audio is not None:
        fbank = load_audio_fbank(audio, AudioPreprocessConfig.for_model(model.config))[None]
    prompt = conversation.render()
    with torch.no_grad():
        answer = model.generate([prompt], audio=fbank, image=pixels, max_new_tokens=max_new_tokens, do_sample=False)[0]
        embeds = model.embed_modalities(audio=fbank, image=pixels)
        prompt_tokens = model.assemble([prompt], embeds, padding_side="left").inputs_embeds.shape[1]
    return answer, prompt_tokens


def check_grounding(body, image, pipeline):
    """Entities equal the pipeline's own for the decoded image (up to float noise between processes),
    masks decode to the image size, the PNG is the pipeline's drawing, spans are its matches."""
    from bubogpt.grounding.result import Entity, annotate_image, decode_mask

    decoded = decode_image(image)
    expected = pipeline.ground_image(decoded)
    served = [Entity(**e) for e in body["entities"]]
    assert [(e.id, e.label, e.colour, e.attributes, len(e.boxes)) for e in served] == [
        (e.id, e.label, e.colour, e.attributes, len(e.boxes)) for e in expected
    ]
    for got, want in zip(served, expected):
        assert got.score == pytest.approx(want.score, abs=2e-3)
        np.testing.assert_allclose(got.boxes, want.boxes, atol=0.5)
        for got_rle, want_rle in zip(got.masks, want.masks):
            got_mask, want_mask = decode_mask(got_rle), decode_mask(want_rle)
            assert got_mask.shape == (decoded.height, decoded.width)
            assert (got_mask & want_mask).sum() >= 0.98 * (got_mask | want_mask).sum()
    annotated = Image.open(io.BytesIO(base64.b64decode(body["annotated_image"])))
    assert annotated.format == "PNG" and annotated.size == decoded.size
    drawn = np.asarray(annotate_image(decoded, served), dtype=np.int16)
    assert np.abs(np.asarray(annotated.convert("RGB"), dtype=np.int16) - drawn).max() == 0
    assert body["spans"] == [dataclasses.asdict(span) for span in pipeline.match(body["answer"], served)]
    for span in body["spans"]:
        assert body["answer"][span["start"]:span["end"]] == span["text"]


SCENE = scene(11, ("circle", "square"))
IMAGE = image_bytes(SCENE.pixels)
MATCHED_AUDIO = sound_bytes(source_sound("circle"), seed=1)  # made by an object in the picture
UNRELATED_AUDIO = sound_bytes(source_sound("star"), seed=2)  # made by nothing in the picture

COMBINATIONS = {
    "text": (None, None, "Hello, who are you?"),
    "image": (IMAGE, None, "What shapes are in the picture?"),
    "audio": (None, MATCHED_AUDIO, "What do you hear?"),
    "image+matched_audio": (IMAGE, MATCHED_AUDIO, "Which object makes the sound?"),
    "image+unrelated_audio": (IMAGE, UNRELATED_AUDIO, "Is the sound related to the picture?"),
}


@pytest.mark.parametrize("encoding", ["json", "multipart"])
@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_chat_answers_like_the_model_for_every_input_combination(serve_app, reference, direct_grounding, name, encoding):
    image, audio, question = COMBINATIONS[name]
    if encoding == "json":
        payload = {"message": question, "temperature": 0, "max_new_tokens": 12}
        payload |= {"image": b64(image)} if image else {}
        payload |= {"audio": b64(audio)} if audio else {}
        response = serve_app.post("/v1/chat", json=payload)
    else:
        files = {"image": ("scene.jpg", image, "image/jpeg")} if image else {}
        files |= {"audio": ("sound.wav", audio, "audio/wav")} if audio else {}
        response = serve_app.post("/v1/chat", data={"message": question, "temperature": "0", "max_new_tokens": "12"},
                                  files=files or None)  # fmt: skip
    assert response.status_code == 200, response.text
    body = response.json()
    answer, prompt_tokens = reference_answer(reference, [("user", question)], image, audio)
    assert body["answer"] == answer
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    if body["finish_reason"] == "length":
        assert body["usage"]["completion_tokens"] == 12
    if image is None:
        assert body["entities"] == [] and body["spans"] == [] and body["annotated_image"] is None
        assert body["timings"]["grounding_ms"] == 0.0 and "grounding" not in body["cache"]
    else:
        assert body["entities"], "the scene's shapes were not grounded"
        check_grounding(body, image, direct_grounding)
    assert ("audio_encoder" in body["cache"]) == (audio is not None)
    assert ("vision_encoder" in body["cache"]) == (image is not None)


def test_modalities_change_the_answer(serve_app):
    """The media reach the model: the same question with and without them gets other answers."""
    answers = set()
    for image, audio in [(None, None), (IMAGE, None), (None, MATCHED_AUDIO), (IMAGE, UNRELATED_AUDIO)]:
        payload = {"message": "Describe it.", "temperature": 0, "max_new_tokens": 12}
        payload |= ({"image": b64(image)} if image else {}) | ({"audio": b64(audio)} if audio else {})
        answers.add(serve_app.chat(**payload)["answer"])
    assert len(answers) >= 3


def test_multi_turn_chat_about_one_image_reuses_encoder_and_grounding(serve_app, reference):
    image = image_bytes(scene(23, ("triangle", "hexagon", "cross")).pixels, "PNG")  # new to the server
    first = serve_app.chat(message="What is in the picture?", image=b64(image), temperature=0, max_new_tokens=10)
    assert first["cache"] == {"vision_encoder": "miss", "grounding": "miss"}
    history = [{"role": "user", "content": "What is in the picture?"}, {"role": "assistant", "content": first["answer"]}]
    before = serve_app.metrics()
    second = serve_app.chat(message="Where is it?", history=history, image=b64(image), temperature=0, max_new_tokens=10)
    after = serve_app.metrics()
    assert second["cache"] == {"vision_encoder": "hit", "grounding": "hit"}
    assert second["entities"] == first["entities"]
    expected, _ = reference_answer(
        reference, [("user", "What is in the picture?"), ("assistant", first["answer"]), ("user", "Where is it?")], image,
        max_new_tokens=10,
    )  # fmt: skip
    assert second["answer"] == expected
    # nothing was recomputed: the counters moved by hits only
    assert after["llm"]["encoder_cache"]["hits"] == before["llm"]["encoder_cache"]["hits"] + 1
    assert after["llm"]["encoder_cache"]["misses"] == before["llm"]["encoder_cache"]["misses"]
    assert after["grounding"]["cache"]["misses"] == before["grounding"]["cache"]["misses"]


def test_concurrent_requests_are_batched_and_each_equals_its_own_answer(serve_app, reference):
    questions = [(f"Question number {i}: what now?", 4 + 3 * i) for i in range(8)]

    def ask(item):
        question, max_new_tokens = item
        return serve_app.chat(message=question, temperature=0, max_new_tokens=max_new_tokens)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(ask, questions))
    assert max(body["generation_batch_size"] for body in bodies) > 1
    for (question, max_new_tokens), body in zip(questions, bodies):
        assert body["answer"] == reference_answer(reference, [("user", question)], max_new_tokens=max_new_tokens)[0]


# -- the OpenAI-compatible endpoint, through the official client ------------------------------------


@pytest.fixture(scope="module")
def client(serve_app):
    return openai.OpenAI(base_url=serve_app.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def openai_messages(question, image=None, audio=None):
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(image, "image/jpeg")}})
    if audio is not None:
        content.append({"type": "input_audio", "input_audio": {"data": b64(audio), "format": "wav"}})
    return [{"role": "user", "content": content}]


def test_openai_client_lists_the_model(client, serve_app):
    preset = reference_preset(serve_app)
    assert [m.id for m in client.models.list().data] == [f"bubogpt-{preset}"]


def reference_preset(serve_app):
    import json

    return json.loads((serve_app.model_dir / "bubogpt_config.json").read_text())["preset"]


@pytest.mark.parametrize("name", ["text", "image+matched_audio"])
def test_openai_client_chat_completion(client, reference, direct_grounding, name):
    image, audio, question = COMBINATIONS[name]
    model = client.models.list().data[0].id
    completion = client.chat.completions.create(
        model=model, messages=openai_messages(question, image, audio), max_tokens=12, temperature=0
    )
    expected, prompt_tokens = reference_answer(reference, [("user", question)], image, audio)
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens == prompt_tokens
    grounding = completion.model_extra["grounding"]
    if image is None:
        assert grounding is None
    else:
        check_grounding({**grounding, "answer": expected}, image, direct_grounding)


@pytest.mark.parametrize("name", ["audio", "image"])
def test_openai_client_streaming(client, reference, direct_grounding, name):
    image, audio, question = COMBINATIONS[name]
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, messages=openai_messages(question, image, audio), max_tokens=24, temperature=0, stream=True
    )
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    expected, prompt_tokens = reference_answer(reference, [("user", question)], image, audio, max_new_tokens=24)
    assert text == expected
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    if len(reference.tokenizer(expected, add_special_tokens=False).input_ids) > 1:
        assert len(content_chunks) > 1  # streamed piece by piece, not as one block
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0] is chunks[-1]
    assert final[0].usage.prompt_tokens == prompt_tokens
    grounding = final[0].model_extra["grounding"]
    if image is None:
        assert grounding is None
    else:
        check_grounding({**grounding, "answer": expected}, image, direct_grounding)


def test_allow_listed_image_url_is_fetched_and_others_are_not(serve_app, client, reference):
    image = image_bytes(scene(31).pixels)
    (serve_app.media_dir / "allowed" / "scene.jpg").write_bytes(image)
    (serve_app.media_dir / "private" / "scene.jpg").write_bytes(image)
    model = client.models.list().data[0].id

    def ask(url):
        content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                              max_tokens=8, temperature=0)  # fmt: skip

    completion = ask(serve_app.media_url + "/allowed/scene.jpg")
    expected, _ = reference_answer(reference, [("user", "What is this?")], image, max_new_tokens=8)
    assert completion.choices[0].message.content == expected
    with pytest.raises(openai.BadRequestError, match="remote URL"):
        ask(serve_app.media_url + "/private/scene.jpg")  # same server, outside the allowed prefix
