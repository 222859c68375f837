"""The Serve application over HTTP: every input combination, multi-turn caching, the OpenAI
endpoint through the official client (streaming and not), allow-listed media URLs.

Independent checks: each answer is compared with the model library called directly in this process
(same model directory: preprocess -> Conversation -> BuboGPT.generate, greedy), and each grounding
result with the grounding pipeline called directly on the decoded image.
"""

import concurrent.futures

import openai
import pytest

from serve_harness import (
    API_KEY,
    b64,
    check_grounding,
    data_url,
    image_bytes,
    reference_answer,
    scene,
    sound_bytes,
    source_sound,
)


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
