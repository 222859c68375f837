"""The OpenAI parameters through the official client: `stop`, `seed`, `stream_options.include_usage`,
`GET /v1/models/{id}`, the parameters the server refuses by name; and images of any valid shape
(extreme aspect ratios, 1x1) end to end.

Independent checks: answers are compared with the model library called directly in this process
(greedy, the same model directory) and cut at the stop string here; grounding is compared with the
grounding pipeline called directly on the decoded image (serve_harness.check_grounding).
"""

import concurrent.futures

import numpy as np
import openai
import pytest
from PIL import Image

from serve_harness import API_KEY, check_grounding, data_url, image_bytes, reference_answer, scene


@pytest.fixture(scope="module")
def client(serve_app):
    return openai.OpenAI(base_url=serve_app.url + "/v1", api_key=API_KEY, max_retries=0, timeout=90)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def user(text, image=None):
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(image, "image/png")}})
    return [{"role": "user", "content": content}]


def stream_text(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# -- stop ------------------------------------------------------------------------------------------


def test_stop_ends_the_text_before_the_first_stop_string(client, model_id, reference):
    question = "What shapes are in the picture?"
    image = image_bytes(scene(11).pixels, "PNG")
    full, _ = reference_answer(reference, [("user", question)], image, max_new_tokens=32)
    words = full.split()
    assert len(words) >= 4, f"the model's answer is too short to cut: {full!r}"
    early, late = words[1], words[-2]  # two stop strings; the earlier occurrence wins
    expected = full[: full.index(early)].rstrip()  # every answer is stripped of trailing whitespace

    completion = client.chat.completions.create(
        model=model_id, messages=user(question, image), max_tokens=32, temperature=0, stop=[late, early]
    )
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason == "stop"

    chunks = list(client.chat.completions.create(
        model=model_id, messages=user(question, image), max_tokens=32, temperature=0, stop=early, stream=True
    ))  # fmt: skip
    assert stream_text(chunks) == expected  # no delta ever showed the stop string or what follows it
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]

    # A stop string the answer does not contain changes nothing.
    absent = client.chat.completions.create(
        model=model_id, messages=user(question, image), max_tokens=32, temperature=0, stop=["zebra-unicorn"]
    )
    assert absent.choices[0].message.content == full


# -- seed ------------------------------------------------------------------------------------------


def test_same_seed_same_sample_also_under_concurrent_load(client, model_id):
    """Sampling at temperature 2: the same seed gives the same text, alone or while other requests
    share the replica; other seeds give other samples."""

    def ask(seed, question="Tell me a story about the circle."):
        completion = client.chat.completions.create(model=model_id, messages=user(question), max_tokens=24,
                                                    temperature=2.0, top_p=1.0, seed=seed)  # fmt: skip
        return completion.choices[0].message.content

    alone = ask(7)
    assert ask(7) == alone
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        noise = [pool.submit(ask, None, f"Unrelated question {i}?") for i in range(4)]
        again = [pool.submit(ask, 7) for _ in range(2)]
        assert [f.result() for f in again] == [alone, alone]
        [f.result() for f in noise]
    others = {ask(seed) for seed in (1, 2, 3, 4)}
    assert len(others | {alone}) >= 2, "different seeds gave the same sample every time"


# -- usage in streams, model retrieval -------------------------------------------------------------


def test_include_usage_adds_a_last_chunk_with_the_usage(client, model_id, reference):
    question = "Hello, who are you?"
    expected, prompt_tokens = reference_answer(reference, [("user", question)], max_new_tokens=12)
    chunks = list(client.chat.completions.create(model=model_id, messages=user(question), max_tokens=12,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    assert stream_text(chunks) == expected
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens == prompt_tokens
    # the answer's tokens, plus the end marker's when the model ended the answer itself
    assert len(reference.tokenizer(expected, add_special_tokens=False).input_ids) <= last.usage.completion_tokens <= 12
    assert last.usage.total_tokens == prompt_tokens + last.usage.completion_tokens
    assert sum(1 for c in chunks if not c.choices) == 1
    whole = client.chat.completions.create(model=model_id, messages=user(question), max_tokens=12, temperature=0)
    assert last.usage == whole.usage  # the same request, not streamed

    plain = list(client.chat.completions.create(model=model_id, messages=user(question), max_tokens=12,
                                                temperature=0, stream=True))  # fmt: skip
    assert all(c.choices for c in plain)  # no usage chunk unless asked


def test_models_retrieve(client, model_id):
    model = client.models.retrieve(model_id)
    assert (model.id, model.object, model.owned_by) == (model_id, "model", "bubogpt")
    with pytest.raises(openai.NotFoundError, match="gpt-4o"):
        client.models.retrieve("gpt-4o")


# -- refused parameters ----------------------------------------------------------------------------

REFUSED = {
    "n": 2,
    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    "logprobs": True,
    "top_logprobs": 3,
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "required",
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "logit_bias": {"5": 10},
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_parameters_not_honoured_are_refused_by_name(client, model_id, name):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=user("hi"), max_tokens=4, **{name: REFUSED[name]})
    assert info.value.param == name
    assert name in info.value.message


def test_no_op_values_of_refused_parameters_are_accepted(client, model_id, reference):
    expected, _ = reference_answer(reference, [("user", "hi")], max_new_tokens=4)
    completion = client.chat.completions.create(model=model_id, messages=user("hi"), max_tokens=4, temperature=0, n=1,
                                                presence_penalty=0, frequency_penalty=0, logprobs=False,
                                                response_format={"type": "text"})  # fmt: skip
    assert completion.choices[0].message.content == expected


# -- images of any valid shape ---------------------------------------------------------------------


@pytest.mark.parametrize("width, height", [(4000, 8), (8, 4000), (1, 1)])
def test_extreme_aspect_ratio_images_work_end_to_end(client, model_id, reference, direct_grounding, width, height):
    pixels = np.asarray(Image.fromarray(scene(11).pixels).resize((width, height), Image.BILINEAR))
    image = image_bytes(pixels, "PNG")
    question = "What shapes are in the picture?"
    completion = client.chat.completions.create(model=model_id, messages=user(question, image), max_tokens=12,
                                                temperature=0)  # fmt: skip
    expected, _ = reference_answer(reference, [("user", question)], image, max_new_tokens=12)
    assert completion.choices[0].message.content == expected
    grounding = completion.model_extra["grounding"]
    check_grounding({**grounding, "answer": expected}, image, direct_grounding)  # as the pipeline grounds it
    for entity in grounding["entities"]:
        assert all(mask["size"] == [height, width] for mask in entity["masks"])


@pytest.mark.parametrize("width, height", [(4000, 8), (8, 4000), (4000, 1), (1, 4000), (1, 1)])
def test_every_grounding_stage_takes_extreme_shapes(direct_grounding, width, height):
    """The pipeline itself (no serving code): the detector's and SAM's resizes keep every side at
    least one pixel, so tagging, detection and a box prompt's mask all work on these shapes."""
    pixels = np.asarray(Image.fromarray(scene(11).pixels).resize((width, height), Image.BILINEAR))
    entities = direct_grounding.ground_image(Image.fromarray(pixels))
    for entity in entities:
        assert all(mask["size"] == [height, width] for mask in entity.masks)
    masks = direct_grounding.segmenter.segment(pixels, [[0, 0, width, height]])  # SAM even if nothing was found
    assert masks.shape == (1, height, width)


def test_docs_show_the_request_bodies(serve_app):
    document = serve_app.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    for path, model in [("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/chat", "ChatBody")]:
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
    completion = schemas["ChatCompletionRequest"]
    assert {"messages", "max_tokens", "stop", "seed", "stream_options"} <= set(completion["properties"])
    assert completion["additionalProperties"] is False  # unknown fields are refused, as documented
    assert "n" not in completion["properties"]  # refused parameters are not advertised
    assert serve_app.get("/docs").status_code == 200
